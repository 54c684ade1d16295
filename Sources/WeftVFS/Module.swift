// WeftVFS
