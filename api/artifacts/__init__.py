"""A job's artifacts: listing, and downloads streamed in constant memory with Range and an sha256 ETag."""
