import ray  # noqa: F401 - imported before the Ray test, as another test might
