"""Code the tests share (servers, remotes); fixtures that use it live in tests/conftest.py."""
