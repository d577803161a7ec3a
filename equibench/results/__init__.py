"""The results contract: typed, versioned records, the Status enum, the append-only store and its readers."""
