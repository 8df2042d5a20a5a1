"""Where agents keep parts on disk."""
