import flows  # noqa: F401 - the application's schema: params files hold the pipeline's sections too
