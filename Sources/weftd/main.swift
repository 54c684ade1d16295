print("weftd")
