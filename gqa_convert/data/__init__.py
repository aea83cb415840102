"""Text data: documents from files, folders or the Hub, and the token files training reads."""
