// WeftNet
