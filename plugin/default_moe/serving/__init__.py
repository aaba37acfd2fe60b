"""Files an export writes beside the weights (they import nothing from default_moe)."""
