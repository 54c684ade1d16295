// WeftMeta
