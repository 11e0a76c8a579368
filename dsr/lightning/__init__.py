"""Lightning modules and callbacks."""
