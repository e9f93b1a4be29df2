"""The one line that enables the test kit's fixtures: bus, recorder, faults."""

pytest_plugins = ["eventbus.testing"]
