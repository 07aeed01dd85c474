"""What users call: the CLI, the offline Python API, the Ray Serve app and the job entry point."""
