// WeftFUSE
