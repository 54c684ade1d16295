import CFuse3
import CWeftSupport
import Foundation
import Logging
import WeftFUSE
import WeftHub
import WeftMeta
import WeftNet
import WeftProto
import WeftVFS

/// Settings of one `weft mount`.
public struct MountRequest {
    public var source: HubSource
    public var mountpoint: String
    public var vfs = VFSOptions()
    public var mount = MountOptions()
    public var durability: DurabilityMode = .strict
    /// Bound of every call to a remote hub, after which it fails with ETIMEDOUT (SPEC.md §12.7).
    public var hubTimeoutMs = HubOpener.defaultRequestTimeoutMs
    /// Embedded hub: free disk space file data may not take (SPEC.md §9.1); nil: the default.
    public var reserveBytes: UInt64?
    /// Remote hubs, zstd volumes: the agent compresses what it uploads (SPEC.md §4, "Compressed
    /// uploads"); false: it sends raw bytes and the hub compresses them.
    public var compressUploads = true
    /// A remote single hub on this machine: read its objects from its store (SPEC.md §4,
    /// Co-located reads; `weft mount --local-reads`).
    public var localReads = true
    /// With `localReads`: write uploads into that store and have the hub take them over
    /// (SPEC.md §4, Co-located writes; `weft mount --local-writes`).
    public var localWrites = true
    public var pidFile: String?
    /// A file descriptor to report readiness on ("ok" or "error: ..."), for --background.
    public var notifyFD: Int32?

    public init(source: HubSource, mountpoint: String) {
        self.source = source
        self.mountpoint = mountpoint
    }
}

/// The node agent process: opens the hub, mounts FUSE, serves until unmounted, then commits
/// everything and lets go of the hub.
public enum Mounter {
    /// Checks that `mountpoint` is an existing directory that is not already a mount.
    public static func validateMountpoint(_ mountpoint: String) throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: mountpoint, isDirectory: &isDirectory) else {
            throw WeftError(ENOENT, "mountpoint \(mountpoint) does not exist")
        }
        guard isDirectory.boolValue else { throw WeftError(ENOTDIR, "mountpoint \(mountpoint) is not a directory") }
        if MountTable.isMountpoint(mountpoint) {
            throw WeftError(EBUSY, "mountpoint \(mountpoint) is busy: something is already mounted there")
        }
    }

    /// Keeps the agent's memory within its configured bounds: buffers of 512 KiB and more
    /// (write extents, read slabs) are mapped on their own and go back to the kernel when freed,
    /// instead of lingering in per-thread malloc arenas.
    public static func boundMallocRetention() {
        weft_bound_malloc(512 * 1024, 4, 8 * 1024 * 1024)
    }

    public static func run(_ request: MountRequest, logger: Logger) throws {
        boundMallocRetention()
        // Up to 512 open objects with two descriptors each (SPEC.md §3.2, Direct I/O), FUSE and
        // the hub connections: 1,024, a common soft limit, is too few.
        ProcessLimits.raiseOpenFileLimit()
        func notify(_ message: String) {
            guard let fd = request.notifyFD else { return }
            let line = message + "\n"
            _ = line.withCString { Glibc.write(fd, $0, strlen($0)) }
            Glibc.close(fd)
        }
        var opened: OpenedHub?
        var server: HubServer?
        do {
            try validateMountpoint(request.mountpoint)
            let hubAPI: HubAPI
            switch request.source {
            case let .remote(address, ""):
                var vfsOptions = request.vfs
                vfsOptions.agentName = "\(ProcessInfo.processInfo.hostName):\(getpid()):\(request.mountpoint)"
                let global = try GlobalRoot.open(address: address, options: vfsOptions, requestTimeoutMs: request.hubTimeoutMs,
                                                 compressUploads: request.compressUploads, logger: logger)
                opened = OpenedHub(api: global.entry, local: nil, remote: global.entry)
                try serve(global.namespace, request, notify: notify, logger: logger)
                global.close(logger: logger)
                opened?.close()
                return
            case let .remote(address, volume):
                let (api, connections) = try HubOpener.openVolumeAPI(address: address, volume: volume ?? "",
                                                                     requestTimeoutMs: request.hubTimeoutMs,
                                                                     compressUploads: request.compressUploads, logger: logger)
                for connection in connections {
                    connection.localReads = request.localReads
                    connection.localWrites = request.localWrites
                }
                opened = OpenedHub(api: api, local: nil, remote: nil, connections: connections)
                hubAPI = api
            case .directory(let path):
                if EmbeddedSocket.isServed(path) {
                    throw WeftError(EBUSY, "hub directory \(path) is in use by another mount or weftd; "
                                    + "mount it through that process's weft:// address instead")
                }
                let local = try HubOpener.open(request.source, durability: request.durability, reserveBytes: request.reserveBytes,
                                               recover: true, logger: logger)
                opened = local
                hubAPI = local.api
                // Serve the embedded hub to local admin commands (weft status / fsck DIR).
                let socketServer = HubServer(hub: hubAPI, logger: logger, workerThreads: 2, eventLoopThreads: 1)
                try socketServer.listen(unixSocketPath: EmbeddedSocket.path(path))
                server = socketServer
            }
            var vfsOptions = request.vfs
            vfsOptions.agentName = "\(ProcessInfo.processInfo.hostName):\(getpid()):\(request.mountpoint)"
            if case let .remote(_, volume?) = request.source { vfsOptions.volume = volume }
            let vfs = try VFS(hub: hubAPI, options: vfsOptions, logger: logger)
            try serve(vfs, request, notify: notify, logger: logger)
            HubOpener.logCompressedUploads(opened?.connections ?? [], logger: logger)
            HubOpener.logLocalStore(opened?.connections ?? [], logger: logger)
            server?.shutdown()
            opened?.close()
        } catch {
            notify("error: \(error)")
            server?.shutdown()
            opened?.close()
            throw error
        }
    }
}

extension Mounter {
    /// Mounts `layer` and serves it until unmounted.
    static func serve(_ layer: FileSystemLayer, _ request: MountRequest, notify: (String) -> Void, logger: Logger) throws {
        var mountOptions = request.mount
        mountOptions.fsName = "weft:\(request.source)"
        let adapter = FUSEAdapter(vfs: layer, mountpoint: request.mountpoint, options: mountOptions, logger: logger)
        try adapter.mount()
        if let pidFile = request.pidFile {
            try? "\(getpid())\n".write(toFile: pidFile, atomically: true, encoding: .utf8)
        }
        try MountTable.register(mountpoint: request.mountpoint, pid: getpid())
        logger.info("mounted \(request.source) at \(request.mountpoint)")
        notify("ok")
        defer { MountTable.unregister(mountpoint: request.mountpoint) }
        try adapter.runUntilUnmounted()
        logger.info("unmounted \(request.mountpoint)")
    }
}

extension FUSEAdapter {
    /// Serves until unmounted; SIGTERM, SIGINT and SIGHUP unmount cleanly.
    func runUntilUnmounted() throws {
        try run()
    }
}
