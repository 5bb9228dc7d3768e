"""Development stand-ins. Never part of the production image."""
