#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import Logging
import WeftCluster
import WeftHub
import WeftMeta
import WeftProto

/// A hub that is a member of a cluster (SPEC.md §12): the `HubAPI` that `weftd --etcd` serves.
///
/// It is the home of the volumes the cluster map homes here, one `Hub` per volume in
/// `DIR/volumes/<id>/`, opened (formatted first if new) as soon as the map names them. Every
/// session belongs to one volume: requests are routed by their session to that volume's hub.
/// Guarantees: a volume homed elsewhere is refused with EREMOTE naming its home; a session of
/// a volume is never routed to another volume; volumes are opened at most once.
public final class FabricHub: HubAPI, @unchecked Sendable {
    public let directory: String
    public let member: ClusterMember
    let durability: DurabilityMode
    /// Free disk space no chunk object may take (SPEC.md §9.1); nil: `ChunkStore.defaultReserveBytes`.
    let reserveBytes: UInt64?
    let logger: Logger

    private struct Route {
        var hub: Hub
        var inner: SessionID
        var volumeID: UInt16
    }

    let lock = NSLock()
    var volumes: [UInt16: Hub] = [:]
    private var sessions: [SessionID: Route] = [:]
    var nextSession: SessionID = 1
    private var closed = false
    private let opener = DispatchQueue(label: "weft.fabric.volumes")
    /// `start()` finished (see `waitStarted`); `isStarted` is guarded by `started`.
    private let started = NSCondition()
    private var isStarted = false
    /// Chunk stores per volume (home or not) and data-only sessions (SPEC.md §12.5).
    var dataVolumes: [UInt16: VolumeData] = [:]
    var dataSessions: [SessionID: DataSession] = [:]
    /// Objects fetched from other hubs, bounded (`weftd --cache-gb`).
    public let readThrough: ReadThrough

    /// Default bound of the read-through cache (`weftd --cache-gb`): 16 GiB.
    public static let defaultCacheBytes: UInt64 = 16 << 30

    /// `directory` must hold a hub made by `FabricHub.prepare`; `member` must have joined before
    /// `start()`, which calls that need the cluster map wait for.
    /// `connectPeer` opens a connection to another hub at an address (`HOST:PORT`) for
    /// read-through fetches; `cacheBytes` bounds the cached copies of all volumes together.
    public init(directory: String, member: ClusterMember, durability: DurabilityMode, logger: Logger,
                cacheBytes: UInt64 = FabricHub.defaultCacheBytes, reserveBytes: UInt64? = nil,
                connectPeer: @escaping (String) throws -> HubAPI = { address in
                    throw WeftError(ENOTSUP, "no peer transport configured to reach hub at \(address)")
                }) {
        self.directory = directory
        self.member = member
        self.durability = durability
        self.reserveBytes = reserveBytes
        self.logger = logger
        readThrough = ReadThrough(capacityBytes: cacheBytes, connectPeer: connectPeer, logger: logger)
    }

    // MARK: Hub directory

    /// What `DIR/hub.json` records.
    public struct Identity: Codable, Equatable {
        public var format: Int
        public var cluster: String
        public var name: String
        public var id: UInt16?
    }

    static func identityPath(_ directory: String) -> String { directory + "/hub.json" }

    /// Creates `directory` for hub `name` of `cluster` if new, or checks that it belongs to them.
    /// Returns the hub id it recorded, if any.
    public static func prepare(directory: String, cluster: String, name: String) throws -> UInt16? {
        let files = FileManager.default
        if Hub.exists(at: directory) {
            throw WeftError(EINVAL, "\(directory) holds a single-hub volume (weft format); a cluster hub needs its own directory")
        }
        if let data = files.contents(atPath: identityPath(directory)) {
            guard let identity = try? JSONDecoder().decode(Identity.self, from: data) else {
                throw WeftError(EIO, "\(identityPath(directory)) is damaged")
            }
            guard identity.cluster == cluster, identity.name == name else {
                throw WeftError(EINVAL, "\(directory) belongs to hub '\(identity.name)' of cluster '\(identity.cluster)', "
                                + "not '\(name)' of '\(cluster)'")
            }
            return identity.id
        }
        try files.createDirectory(atPath: directory + "/volumes", withIntermediateDirectories: true)
        try record(Identity(format: 2, cluster: cluster, name: name, id: nil), in: directory)
        return nil
    }

    /// Records the id etcd gave this hub.
    public static func recordID(_ id: UInt16, directory: String) throws {
        guard let data = FileManager.default.contents(atPath: identityPath(directory)),
              var identity = try? JSONDecoder().decode(Identity.self, from: data) else {
            throw WeftError(EIO, "\(identityPath(directory)) is missing or damaged")
        }
        guard identity.id != id else { return }
        identity.id = id
        try record(identity, in: directory)
    }

    private static func record(_ identity: Identity, in directory: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let path = identityPath(directory)
        try encoder.encode(identity).write(to: URL(fileURLWithPath: path + ".tmp"))
        let fd = Glibc.open(path + ".tmp", O_RDONLY)
        if fd >= 0 { fsync(fd); Glibc.close(fd) }
        guard Glibc.rename(path + ".tmp", path) == 0 else { throw WeftError(errno, "cannot write \(path)") }
    }

    func volumeDirectory(_ id: UInt16) -> String { "\(directory)/volumes/\(id)" }

    // MARK: Life cycle

    /// Opens every volume the map homes here and follows the map for new ones.
    public func start() throws {
        try openHomeVolumes(member.map)
        let opener = self.opener
        member.onChange { [weak self] map in
            opener.async { [weak self] in try? self?.openHomeVolumes(map) }
        }
        started.withLock {
            isStarted = true
            started.broadcast()
        }
    }

    /// Most seconds a call that needs the cluster map waits for `start()`.
    public static let startWaitSeconds: TimeInterval = 30

    /// Waits until `start()` has loaded the map and opened the volumes homed here. weftd listens
    /// before it joins (the address it registers is the bound one): a hub restarted with agents
    /// reconnecting at once must not answer them from an empty map ("no volume named …").
    func waitStarted() throws {
        try started.withLock {
            let deadline = Date().addingTimeInterval(Self.startWaitSeconds)
            while !isStarted {
                if !started.wait(until: deadline) {
                    throw WeftError(EAGAIN, "hub '\(member.hubName)' is still joining its cluster; try again")
                }
            }
        }
    }

    public func close() {
        let hubs: [Hub] = lock.withLock {
            closed = true
            return Array(volumes.values)
        }
        for hub in hubs { try? hub.close() }
    }

    /// Opens (formatting if new) each volume of `map` homed at this hub, then advertises them.
    private func openHomeVolumes(_ map: ClusterMap) throws {
        var firstError: Error?
        for record in map.volumes.values where record.home == member.hubName {
            do {
                _ = try openVolume(record)
            } catch {
                logger.error("cannot open volume", metadata: ["volume": "\(record.name)", "error": "\(error)"])
                firstError = firstError ?? error
            }
        }
        let serving = lock.withLock { volumes.keys.compactMap { map.volume(id: $0)?.name }.sorted() }
        try? member.advertise(serving: serving)
        if let firstError { throw firstError }
    }

    private func openVolume(_ record: VolumeRecord) throws -> Hub {
        return try lock.withLock { () throws -> Hub in
            if let open = volumes[record.id] { return open }
            guard !closed else { throw WeftError(ESHUTDOWN, "hub is shutting down") }
            let path = volumeDirectory(record.id)
            if !Hub.exists(at: path) {
                guard let compression = Compression(name: record.compression) else {
                    throw WeftError(EINVAL, "volume '\(record.name)' has unknown compression '\(record.compression)'")
                }
                try Hub.format(directory: path, chunkSizeBytes: Int(record.chunkSizeBytes), compression: compression,
                               force: false, firstSliceID: UInt64(record.id) << 48 | 1)
                logger.info("formatted volume", metadata: ["volume": "\(record.name)", "id": "\(record.id)"])
            }
            let hub = try Hub(directory: path, durability: durability, pageCacheReads: true, reserveBytes: reserveBytes,
                              logger: logger)
            hub.deleteAtHolder = { [weak self] holder, ids in
                guard let self else { throw WeftError(ESHUTDOWN, "hub is shutting down") }
                try self.deleteAtHolder(holder, ids: ids)
            }
            try hub.recover()
            volumes[record.id] = hub
            logger.info("serving volume", metadata: ["volume": "\(record.name)", "id": "\(record.id)"])
            return hub
        }
    }

    // MARK: Routing

    func route(_ context: RequestContext) throws -> (Hub, RequestContext) {
        guard let route = lock.withLock({ sessions[context.session] }) else {
            if dataSession(context) != nil {
                throw WeftError(EBADF, "session \(context.session) is a data session: it takes only chunk calls")
            }
            throw WeftError(EBADF, "unknown session \(context.session)")
        }
        var inner = context
        inner.session = route.inner
        return (route.hub, inner)
    }

    /// The volume a volume session (not a data session) belongs to.
    func volumeID(ofSession context: RequestContext) throws -> UInt16 {
        guard let route = lock.withLock({ sessions[context.session] }) else {
            throw WeftError(EBADF, "unknown session \(context.session)")
        }
        return route.volumeID
    }

    // MARK: HubAPI — sessions and cluster

    public func openSession(agentName: String) throws -> (SessionID, VolumeInfo) {
        throw WeftError(EINVAL, "hub '\(member.hubName)' is part of cluster '\(member.map.cluster)': "
                        + "name a volume (weft://HOST:PORT/VOLUME) or mount the global root (weft://HOST:PORT/)")
    }

    public func openSession(agentName: String, volume name: String) throws -> (SessionID, VolumeInfo) {
        try waitStarted()
        let map = member.map
        guard !name.isEmpty else { return try openSession(agentName: agentName) }
        guard let record = map.volumes[name] else { throw WeftError(ENOENT, "no volume named '\(name)' in the cluster") }
        guard record.home == member.hubName else {
            let address = map.address(of: record.home, from: member.hubName) ?? "down"
            throw WeftError(EREMOTE, "volume '\(name)' is homed at hub '\(record.home)' (\(address))")
        }
        let hub = try openVolume(record)
        let (inner, info) = try hub.openSession(agentName: agentName)
        let id: SessionID = lock.withLock {
            let id = nextSession
            nextSession += 1
            sessions[id] = Route(hub: hub, inner: inner, volumeID: record.id)
            return id
        }
        return (id, info)
    }

    public func closeSession(_ session: SessionID) throws {
        if closeDataSession(session) { return }
        guard let route = lock.withLock({ sessions.removeValue(forKey: session) }) else { return }
        try route.hub.closeSession(route.inner)
    }

    public func clusterMap() throws -> [UInt8] {
        try waitStarted()
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        var map = member.map
        map.answeredBy = member.hubName
        return Array(try encoder.encode(map))
    }

    public func createVolume(name: String, home: String, chunkSizeBytes: UInt32, compression: Compression) throws -> [UInt8] {
        try waitStarted()
        let size = Int(chunkSizeBytes)
        guard size >= Limits.chunkSizeMinBytes, size <= Limits.chunkSizeMaxBytes, size % Limits.blockSizeBytes == 0 else {
            throw WeftError(EINVAL, "chunk size must be a multiple of \(Limits.blockSizeBytes) between "
                            + "\(Limits.chunkSizeMinBytes) and \(Limits.chunkSizeMaxBytes) bytes")
        }
        guard member.map.hubIDs[home] != nil else { throw WeftError(ENOENT, "no hub named '\(home)' in the cluster") }
        let (record, revision) = try ClusterAdmin.createVolume(etcd: member.etcd, keys: member.keys, name: name, home: home,
                                                               chunkSizeBytes: chunkSizeBytes, compression: compression.name)
        _ = member.waitForRevision(revision, timeoutMs: 10_000)
        if home == member.hubName {
            _ = try openVolume(record)
            try? member.advertise(serving: lock.withLock { volumes.keys.compactMap { member.map.volume(id: $0)?.name }.sorted() })
        } else if !member.waitUntil(timeoutMs: 10_000, { $0.hubs[home]?.serving?.contains(name) == true }) {
            logger.warning("volume created; its home has not opened it yet", metadata: ["volume": "\(name)", "home": "\(home)"])
        }
        return Array(try JSONEncoder().encode(record))
    }

    public func status() throws -> HubStatus {
        let hubs = lock.withLock { Array(volumes.values) }
        var total = HubStatus(volume: VolumeInfo(formatVersion: 2, uuid: [UInt8](repeating: 0, count: 16), chunkSizeBytes: 0,
                                                 compression: .none, createdNs: 0),
                              logicalBytes: 0, inodes: 0, chunks: 0, storedBytes: 0, connectedAgents: 0, agents: [])
        for hub in hubs {
            let one = try hub.status()
            total.logicalBytes += one.logicalBytes
            total.inodes += one.inodes
            total.chunks += one.chunks
            total.storedBytes += one.storedBytes
            total.connectedAgents += one.connectedAgents
            total.agents += one.agents
        }
        return total
    }

    public func fsck(repair: Bool) throws -> FsckReport {
        let hubs = lock.withLock { volumes.sorted { $0.key < $1.key } }
        return FsckReport.merged(try hubs.map { (id: "\($0.key)", report: try $0.value.fsck(repair: repair)) })
    }
}
