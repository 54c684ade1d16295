// WeftHub
