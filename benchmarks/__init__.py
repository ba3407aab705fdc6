import flows.app  # noqa: F401 - the application: its environment, and params files hold the pipeline's sections too
