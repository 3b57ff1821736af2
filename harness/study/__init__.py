"""Running a study: the walk through its stages, resume, the distributed workers, and `harness train`."""
