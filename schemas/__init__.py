"""Versioned Arrow schemas of the files this project writes."""
