"""Tasks: datasets of conversations or documents with their evaluation rules."""
