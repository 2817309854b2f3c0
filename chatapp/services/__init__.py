"""Framework-free business logic: plain functions taking the session and collaborators they need."""
