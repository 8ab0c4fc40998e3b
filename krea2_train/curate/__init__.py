"""Dataset curation: image quality scores, hashes for deduplication, the processing jobs."""
