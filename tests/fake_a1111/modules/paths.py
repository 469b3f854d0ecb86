"""paths.models_path: A1111's models folder."""

models_path = "/nonexistent/models"
