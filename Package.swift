// swift-tools-version:5.10
// The dependency graph below is Weft's architecture: requests flow downwards only.
//
//   weft (CLI + node agent)      weftd (hub daemon)
//        |        \                   |
//    WeftFUSE   WeftAgent ----------- +
//        |        |                   |
//     WeftVFS   WeftNet (wire, TCP transport)
//        |        |
//        +--- WeftProto (hub API, value types) ---+
//                                        WeftHub (in-process hub)
//                                        /      \
//                                  WeftMeta   WeftChunks
import PackageDescription

let package = Package(
    name: "Weft",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "weft", targets: ["weft"]),
        .executable(name: "weftd", targets: ["weftd"]),
        .executable(name: "weft-link", targets: ["weft-link"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
    ],
    targets: [
        // System libraries through module maps (Debian: librocksdb-dev, libfuse3-dev, libzstd-dev).
        .systemLibrary(name: "CRocksDB", path: "Sources/CRocksDB"),
        .systemLibrary(name: "CFuse3", path: "Sources/CFuse3", pkgConfig: "fuse3"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        // Small C helpers: hardware CRC32C, malloc tuning, the caching transfer-buffer allocator.
        .target(name: "CWeftSupport", path: "Sources/CWeftSupport",
                cSettings: [.unsafeFlags(["-O3"])]),

        // The hub API boundary: value types, errors, binary encoding, the HubAPI protocol.
        .target(name: "WeftProto", dependencies: ["CWeftSupport"]),
        // Metadata engine on RocksDB.
        .target(name: "WeftMeta", dependencies: ["WeftProto", "CRocksDB",
                                                 .product(name: "Logging", package: "swift-log")]),
        // Immutable, checksummed, optionally compressed chunk store.
        .target(name: "WeftChunks", dependencies: ["WeftProto", "CZstd", "CWeftSupport",
                                                   .product(name: "Logging", package: "swift-log")]),
        // The in-process hub: HubAPI over WeftMeta + WeftChunks, sessions, GC, fsck.
        .target(name: "WeftHub", dependencies: ["WeftProto", "WeftMeta", "WeftChunks",
                                                .product(name: "Logging", package: "swift-log")]),
        // Wire codec and the SwiftNIO TCP / Unix-socket transport (client and server).
        .target(name: "WeftNet", dependencies: ["WeftProto", "WeftChunks", "CWeftSupport",
                                                .product(name: "NIOCore", package: "swift-nio"),
                                                .product(name: "NIOPosix", package: "swift-nio"),
                                                .product(name: "Logging", package: "swift-log")]),
        // Node agent VFS: handles, write-back buffers, readers, block cache.
        .target(name: "WeftVFS", dependencies: ["WeftProto",
                                                .product(name: "Logging", package: "swift-log")]),
        // Thin libfuse3 low-level adapter over WeftVFS.
        .target(name: "WeftFUSE", dependencies: ["WeftVFS", "CFuse3",
                                                 .product(name: "Logging", package: "swift-log")]),
        // Cluster map in etcd (v3 JSON gateway over SwiftNIO HTTP/1.1): membership, volumes, routes.
        .target(name: "WeftCluster", dependencies: ["WeftProto",
                                                    .product(name: "NIOCore", package: "swift-nio"),
                                                    .product(name: "NIOPosix", package: "swift-nio"),
                                                    .product(name: "NIOHTTP1", package: "swift-nio"),
                                                    .product(name: "Logging", package: "swift-log")]),
        // A hub in a cluster: home of several volumes, sessions routed per volume (weftd --etcd).
        .target(name: "WeftFabric", dependencies: ["WeftProto", "WeftMeta", "WeftChunks", "WeftHub", "WeftCluster",
                                                   .product(name: "Logging", package: "swift-log")]),
        // User-space WAN link emulator (delay, bandwidth cap, cut/heal): tests, Deploy/ and Bench/.
        .target(name: "WeftLink", dependencies: [.product(name: "NIOCore", package: "swift-nio"),
                                                 .product(name: "NIOPosix", package: "swift-nio"),
                                                 .product(name: "Logging", package: "swift-log")]),
        .executableTarget(name: "weft-link", dependencies: ["WeftLink",
                                                            .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                                            .product(name: "Logging", package: "swift-log")]),
        // Shared command plumbing for both executables: sources, hub opening, daemon start-up.
        .target(name: "WeftAgent", dependencies: ["WeftProto", "CWeftSupport", "WeftHub", "WeftNet", "WeftVFS", "WeftFUSE",
                                                  "WeftCluster",
                                                  .product(name: "Logging", package: "swift-log")]),
        .executableTarget(name: "weft", dependencies: ["WeftAgent", "WeftCluster",
                                                       .product(name: "ArgumentParser", package: "swift-argument-parser")]),
        .executableTarget(name: "weftd", dependencies: ["WeftAgent", "WeftFabric", "WeftCluster",
                                                        .product(name: "Logging", package: "swift-log"),
                                                        .product(name: "ArgumentParser", package: "swift-argument-parser")]),

        // Helpers shared by the test targets (seeded random, errno assertions, quiet loggers).
        .target(name: "WeftTestSupport", dependencies: ["WeftProto", .product(name: "Logging", package: "swift-log")],
                path: "Tests/WeftTestSupport"),
        .testTarget(name: "WeftMetaTests", dependencies: ["WeftMeta", "WeftProto", "WeftTestSupport"]),
        .testTarget(name: "WeftChunksTests", dependencies: ["WeftChunks", "WeftProto", "CWeftSupport", "WeftTestSupport"]),
        .testTarget(name: "WeftNetTests", dependencies: ["WeftNet", "WeftProto", "WeftHub", "WeftChunks", "WeftTestSupport"]),
        .testTarget(name: "WeftClusterTests", dependencies: ["WeftCluster", "WeftProto", "WeftTestSupport"]),
        .testTarget(name: "WeftLinkTests", dependencies: ["WeftLink", "WeftTestSupport",
                                                          .product(name: "NIOCore", package: "swift-nio"),
                                                          .product(name: "NIOPosix", package: "swift-nio")]),
        .testTarget(name: "WeftFabricTests", dependencies: ["WeftFabric", "WeftAgent", "WeftChunks", "WeftCluster", "WeftLink",
                                                            "WeftNet", "WeftProto", "WeftVFS", "WeftTestSupport"]),
        .testTarget(name: "WeftHubTests", dependencies: ["WeftHub", "WeftNet", "WeftProto", "WeftVFS", "WeftChunks", "WeftLink",
                                                    "CWeftSupport", "WeftTestSupport"]),
    ]
)
