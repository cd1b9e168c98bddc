"""Exceptions shared by the library and the services that carry no domain of their own."""


class Cancelled(Exception):
    """The caller went away; the work on its behalf stopped."""
