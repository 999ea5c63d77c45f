"""The arena's server side: one engine thread for every model, and the votes and their ratings."""
