"""Plan time: configuration, sources, content digests, step code and resources. Imports no torch."""
