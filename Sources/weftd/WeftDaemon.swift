import ArgumentParser
import Dispatch
import Foundation
import Logging
import WeftAgent
import WeftCluster
import WeftFabric
import WeftHub
import WeftMeta
import WeftNet
import WeftProto

@main
struct WeftDaemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weftd",
        abstract: "Weft hub daemon: serves a hub's metadata and chunk services to agents.",
        subcommands: [Serve.self])
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the hub in DIR on HOST:PORT until SIGTERM or SIGINT.",
        discussion: """
            Single hub:  weftd serve /srv/weft/hub --listen 0.0.0.0:7070   (DIR made by `weft format`);
                         agents mount weft://HOST:7070.
            Cluster hub: weftd serve /srv/weft/hub-a --listen 0.0.0.0:7070 --hub hub-a --etcd http://ETCD:2379
                         (DIR is created if missing); agents mount weft://HOST:7070/ (global root)
                         or weft://HOST:7070/VOLUME.
            """)

    @Argument(help: "Hub directory.") var directory: String
    @Option(help: "Address to listen on, HOST:PORT.") var listen: String
    @Option(help: "Metadata durability: strict (fsync before reply) or periodic (fsync every second).")
    var durability: String = "strict"
    @Option(help: "Join the cluster whose map is in this etcd (http://HOST:PORT) as a hub.") var etcd: String?
    @Option(help: "This hub's name in the cluster (with --etcd): 1-32 of a-z, 0-9, -.") var hub: String?
    @Option(help: "Cluster name (with --etcd).") var cluster: String = "weft"
    @Option(help: "Address other hubs and agents reach this hub at (default: the --listen address).")
    var advertise: String?
    @Option(help: "Seconds of silence after which an agent's connection is closed and its sessions and locks end (agents ping every second).")
    var sessionTimeout: Double = 15
    @Option(help: "Cluster hub: bound of the read-through cache of objects held by other hubs, GiB (least recently read evicted first).")
    var cacheGb: Double = 16
    @Option(help: "Memory, MiB, for file data sent to agents, read with O_DIRECT and kept for the next reader (least recently read evicted first; SIGUSR1 empties it). 0, the default: serve from the page cache, which grows into free memory and reads ahead.")
    var readCacheMb: Int = 0
    @Option(help: "Let agents on this machine read file data from the chunk store directly (on), or only over the network (off). Single hub only.")
    var localReads: String = "on"
    @Option(help: "Free disk space, MiB, that file data may not take, kept so that metadata changes (unlink, rmdir, truncate) still work on a full disk (default: 5% of the file system, at most 256 MiB; 0: none).")
    var reserveMb: Int?

    func validate() throws {
        if (etcd == nil) != (hub == nil) { throw ValidationError("--etcd and --hub go together") }
        if let hub { try ClusterNames.validateHub(hub) }
        guard (3...3600).contains(sessionTimeout) else { throw ValidationError("--session-timeout must be 3...3600 seconds") }
        guard cacheGb >= 0, cacheGb <= 1_048_576 else { throw ValidationError("--cache-gb must be 0...1048576") }
        guard (0...(1 << 30)).contains(readCacheMb) else { throw ValidationError("--read-cache-mb must be 0...1073741824") }
        if let reserveMb, !(0...(1 << 30)).contains(reserveMb) { throw ValidationError("--reserve-mb must be 0...1073741824") }
        if !["on", "off"].contains(localReads) { throw ValidationError("--local-reads must be on or off") }
    }

    var idleTimeoutMs: Int { Int(sessionTimeout * 1000) }

    var reserveBytes: UInt64? { reserveMb.map { UInt64($0) << 20 } }

    func run() throws {
        // SIGUSR1 empties a single hub's read cache (`waitForSignal`); until then, and on a
        // cluster hub, it must not kill the process.
        signal(SIGUSR1, SIG_IGN)
        ProcessLimits.raiseOpenFileLimit()
        // A hub moves many agents' chunk frames at once: keep more transfer buffers for reuse.
        BulkMemory.setCacheLimit(bytes: 256 << 20)
        guard let mode = DurabilityMode(rawValue: durability) else {
            throw ValidationError("--durability must be strict or periodic")
        }
        guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]),
              (0...65535).contains(port) else {
            throw ValidationError("--listen must be HOST:PORT, got '\(listen)'")
        }
        let host = String(listen[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        Mounter.boundMallocRetention()
        let logger = WeftLogging.logger("weftd")
        let path = URL(fileURLWithPath: directory).standardizedFileURL.path
        if EmbeddedSocket.isServed(path) { throw WeftError(EBUSY, "\(path) is already served by another process") }
        if let etcd, let hub {
            try serveCluster(path: path, host: host, port: port, etcd: etcd, hubName: hub, mode: mode, logger: logger)
            return
        }
        let hub = try Hub(directory: path, durability: mode, pageCacheReads: true, readCacheBytes: readCacheMb << 20,
                          reserveBytes: reserveBytes, logger: logger)
        try hub.recover()
        let server = HubServer(hub: hub, logger: logger, idleTimeoutMs: idleTimeoutMs)
        // Offered before the first connection, so that every agent can ask.
        if localReads == "on" {
            do {
                try server.offerLocalReads(chunkDirectory: hub.chunks.directory)
            } catch {
                logger.warning("co-located reads not offered: \(error)")
            }
        }
        let bound: Int
        do {
            bound = try server.listen(host: host, port: port)
            try server.listen(unixSocketPath: EmbeddedSocket.path(path))
        } catch {
            server.shutdown()
            try? hub.close()
            throw WeftError(EADDRINUSE, "cannot listen on \(listen): \(error)")
        }
        print("weftd serving \(path) on \(host):\(bound)")
        fflush(stdout)
        waitForSignal(onUsr1: { [chunks = hub.chunks] in
            let held = chunks.spanCacheCounters?.heldBytes ?? 0
            chunks.dropSpanCache()
            logger.notice("read cache dropped (\(held >> 20) MiB)")
        })
        logger.info("shutting down")
        server.shutdown()
        try hub.close()
    }

    /// Serves a cluster hub: listens first (the address is registered), joins, opens the volumes
    /// homed here, and leaves the cluster on SIGTERM/SIGINT.
    private func serveCluster(path: String, host: String, port: Int, etcd endpoint: String, hubName: String,
                              mode: DurabilityMode, logger: Logger) throws {
        let knownID = try FabricHub.prepare(directory: path, cluster: cluster, name: hubName)
        let etcdClient = try EtcdClient(endpoint: endpoint)
        defer { etcdClient.close() }
        // Listen before joining: the address registered must be the bound one (port 0 picks).
        let member = try ClusterMember(etcd: etcdClient, cluster: cluster, hubName: hubName, address: "", logger: logger)
        let fabric = FabricHub(directory: path, member: member, durability: mode, logger: logger,
                               cacheBytes: UInt64(cacheGb * Double(1 << 30)), reserveBytes: reserveBytes,
                               connectPeer: { address in
                                   RemoteHub(address: try HubAddress.parse("weft://" + address),
                                             connectTimeoutMs: HubOpener.connectTimeoutMs,
                                             requestTimeoutMs: HubOpener.defaultRequestTimeoutMs * 3, logger: logger)
                               })
        let server = HubServer(hub: fabric, logger: logger, idleTimeoutMs: idleTimeoutMs)
        do {
            let bound = try server.listen(host: host, port: port)
            try server.listen(unixSocketPath: EmbeddedSocket.path(path))
            member.address = advertise ?? "\(host):\(bound)"
            let id = try member.join(knownID: knownID)
            try FabricHub.recordID(id, directory: path)
            try fabric.start()
        } catch {
            member.leave()
            server.shutdown()
            fabric.close()
            throw error
        }
        print("weftd hub \(hubName) (id \(member.hubID)) of cluster \(cluster) serving \(path) on \(member.address)")
        fflush(stdout)
        waitForSignal(onUsr1: { logger.notice("SIGUSR1: a cluster hub keeps no read cache, nothing to drop") })
        logger.info("shutting down")
        member.leave()
        server.shutdown()
        fabric.close()
    }
}

/// Waits for SIGTERM or SIGINT; SIGUSR1 meanwhile calls `onUsr1` (drop the read cache).
func waitForSignal(onUsr1: (@Sendable () -> Void)? = nil) {
    let stop = DispatchSemaphore(value: 0)
    var sources: [DispatchSourceSignal] = []
    if let onUsr1 {
        signal(SIGUSR1, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGUSR1, queue: .global())
        source.setEventHandler { onUsr1() }
        source.resume()
        sources.append(source)
    }
    for signalNumber in [SIGTERM, SIGINT] {
        signal(signalNumber, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
        source.setEventHandler { stop.signal() }
        source.resume()
        sources.append(source)
    }
    stop.wait()
    withExtendedLifetime(sources) {}
}
