"""Analysis of a decoder: the prediction trajectory (Eq. 1-4) and its transition point."""
