"""Small helpers every package may import (no dependency on the rest of the project): user-facing
errors, atomic file writes and tolerant logs, parameter counting."""
