"""Placeholder replaced below."""


def run_demo(out, force=False, only=None):
    raise NotImplementedError
