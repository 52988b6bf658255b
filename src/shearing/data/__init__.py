"""Per-domain data: preparation into MDS shards, the domain-mixture loader, and its manifest."""
