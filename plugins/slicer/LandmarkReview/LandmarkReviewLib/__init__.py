"""The Landmark Review module's logic (plain Python, no Slicer): :mod:`.landmark_review`."""
