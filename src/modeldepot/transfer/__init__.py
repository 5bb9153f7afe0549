"""Moving files between nodes and the Hub: sources, parallel verified downloads, pulls of variants."""
