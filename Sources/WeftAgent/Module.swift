// WeftAgent
