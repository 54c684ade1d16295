// WeftChunks
