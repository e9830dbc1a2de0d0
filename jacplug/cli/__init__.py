"""The ``jacplug`` command line: a thin layer that parses arguments and calls the library."""
