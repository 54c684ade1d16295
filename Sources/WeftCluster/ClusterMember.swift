import Dispatch
import Foundation
import Logging
import WeftProto

/// A hub's membership of the cluster: its id, its leased registration, and a live copy of the
/// cluster map (SPEC.md §12.2).
///
/// Guarantees: `join()` returns once the hub is registered and the map loaded; the
/// registration is renewed every `ttlSeconds / 3` and re-created if etcd lost it; the map
/// follows etcd through a watch, re-established (with a fresh read) after any break; `map`
/// never goes back to an older revision. Thread-safe.
public final class ClusterMember: @unchecked Sendable {
    public static let defaultTTLSeconds = 10

    public let etcd: EtcdClient
    public let keys: ClusterKeys
    public let hubName: String
    /// `HOST:PORT` registered for this hub; set before `join()`.
    public var address: String
    public let ttlSeconds: Int
    let logger: Logger

    private let condition = NSCondition()
    private var current: ClusterMap
    private var listeners: [(ClusterMap) -> Void] = []
    private var watch: EtcdClient.Watch?
    private var stopped = false
    private var lease: Int64 = 0
    public private(set) var hubID: UInt16 = 0
    private let queue = DispatchQueue(label: "weft.cluster")
    private let startedNs = Int64(Date().timeIntervalSince1970 * 1e9)
    private var serving: [String]?

    public init(etcd: EtcdClient, cluster: String, hubName: String, address: String,
                ttlSeconds: Int = ClusterMember.defaultTTLSeconds, logger: Logger) throws {
        try ClusterNames.validateHub(hubName)
        self.etcd = etcd
        keys = ClusterKeys(cluster: cluster)
        self.hubName = hubName
        self.address = address
        self.ttlSeconds = ttlSeconds
        self.logger = logger
        current = ClusterMap(cluster: cluster)
    }

    /// Takes (or finds) this hub's id, registers it under a lease, loads the map and starts
    /// following it. `knownID` is the id recorded in the hub directory, checked against etcd.
    public func join(knownID: UInt16?) throws -> UInt16 {
        let id = try ClusterAdmin.allocateID(etcd: etcd, counter: keys.hubIDCounter, claim: keys.hubID(hubName))
        if let knownID, knownID != id {
            throw WeftError(EINVAL, "hub '\(hubName)' has id \(knownID) in its directory but \(id) in etcd: wrong cluster?")
        }
        hubID = id
        try register()
        try reload()
        queue.async { self.keepAliveLoop() }
        return id
    }

    /// Stops renewing and watching, and removes the registration (the hub leaves at once
    /// instead of after its lease runs out).
    public func leave() {
        let (watch, lease): (EtcdClient.Watch?, Int64) = condition.withLock {
            stopped = true
            condition.broadcast()
            return (self.watch, self.lease)
        }
        watch?.cancel()
        if lease != 0 { try? etcd.revokeLease(lease) }
    }

    /// The latest map seen.
    public var map: ClusterMap { condition.withLock { current } }

    /// Calls `listener` with every newer map (on an internal thread).
    public func onChange(_ listener: @escaping (ClusterMap) -> Void) {
        condition.withLock { listeners.append(listener) }
    }

    /// Waits until the map reflects etcd revision `revision`; false on timeout.
    public func waitForRevision(_ revision: Int64, timeoutMs: Int) -> Bool {
        let deadline = Date(timeIntervalSinceNow: Double(timeoutMs) / 1000)
        return condition.withLock {
            while current.revision < revision {
                if !condition.wait(until: deadline) { return current.revision >= revision }
            }
            return true
        }
    }

    // MARK: Internals

    /// Publishes the names of the volumes this hub serves as home (in its leased record), and
    /// waits (bounded) until this member's map shows them, whoever published them.
    public func advertise(serving names: [String]) throws {
        let (lease, changed): (Int64, Bool) = condition.withLock {
            defer { serving = names }
            return (self.lease, serving != names)
        }
        guard lease != 0 else { return }
        if changed {
            try etcd.put(keys.hub(hubName), try JSONEncoder().encode(record()), lease: lease)
        }
        _ = waitUntil(timeoutMs: 5_000) { [hubName] in Set($0.hubs[hubName]?.serving ?? []).isSuperset(of: names) }
    }

    /// Waits until `condition` holds for the map; false on timeout.
    public func waitUntil(timeoutMs: Int, _ predicate: (ClusterMap) -> Bool) -> Bool {
        let deadline = Date(timeIntervalSinceNow: Double(timeoutMs) / 1000)
        return condition.withLock {
            while !predicate(current) {
                if !condition.wait(until: deadline) { return predicate(current) }
            }
            return true
        }
    }

    private func record() -> HubRecord {
        HubRecord(name: hubName, id: hubID, address: address, startedNs: startedNs,
                  serving: condition.withLock { serving })
    }

    private func register() throws {
        let lease = try etcd.grantLease(ttlSeconds: ttlSeconds)
        try etcd.put(keys.hub(hubName), try JSONEncoder().encode(record()), lease: lease)
        condition.withLock { self.lease = lease }
        logger.info("registered in the cluster", metadata: ["hub": "\(hubName)", "id": "\(hubID)", "lease": "\(lease)"])
    }

    private func keepAliveLoop() {
        while true {
            let (stop, lease): (Bool, Int64) = condition.withLock {
                _ = condition.wait(until: Date(timeIntervalSinceNow: Double(ttlSeconds) / 3))
                return (stopped, self.lease)
            }
            if stop { return }
            do {
                if try etcd.keepAlive(lease: lease) <= 0 {
                    logger.warning("cluster registration expired; registering again", metadata: ["hub": "\(hubName)"])
                    try register()
                }
            } catch {
                if condition.withLock({ stopped }) { return }   // left meanwhile (its client may be closed)
                logger.warning("cannot renew the cluster registration", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Reads the whole map, then watches from the next revision.
    private func reload() throws {
        let (values, revision) = try etcd.list(prefix: keys.root)
        var fresh = ClusterMap(cluster: current.cluster)
        for value in values { keys.apply(key: value.key, value: value.value, to: &fresh) }
        fresh.revision = revision
        publish(fresh)
        let watch = try etcd.watch(prefix: keys.root, fromRevision: revision + 1, onEvents: { [self] events, revision in
            var next = map
            for event in events {
                keys.apply(key: event.keyValue.key, value: event.kind == .put ? event.keyValue.value : nil, to: &next)
            }
            next.revision = max(next.revision, revision)
            publish(next)
        }, onEnd: { [self] error in
            let stop = condition.withLock { stopped }
            if stop { return }
            logger.warning("cluster map watch ended; reading the map again", metadata: ["error": "\(error.map { "\($0)" } ?? "end")"])
            queue.asyncAfter(deadline: .now() + 0.5) { [self] in self.rewatch() }
        })
        condition.withLock { self.watch = watch }
    }

    private func rewatch() {
        if condition.withLock({ stopped }) { return }
        do {
            try reload()
        } catch {
            logger.warning("cannot read the cluster map", metadata: ["error": "\(error)"])
            queue.asyncAfter(deadline: .now() + 1) { [self] in self.rewatch() }
        }
    }

    private func publish(_ map: ClusterMap) {
        let listeners: [(ClusterMap) -> Void]? = condition.withLock {
            guard map.revision >= current.revision else { return nil }
            current = map
            condition.broadcast()
            return self.listeners
        }
        for listener in listeners ?? [] { listener(map) }
    }
}

/// Cluster changes made by admin commands.
public enum ClusterAdmin {
    /// The id claimed at `claim`, or a new one taken from `counter` and claimed atomically.
    /// Ids are 1...65535 and never reused.
    public static func allocateID(etcd: EtcdClient, counter: String, claim: String) throws -> UInt16 {
        for _ in 0..<100 {
            let (existing, _) = try etcd.get(claim)
            if let existing, let record = try? JSONDecoder().decode(IDRecord.self, from: existing.value) {
                return record.id
            }
            let (count, _) = try etcd.get(counter)
            let last = count.flatMap { Int(String(decoding: $0.value, as: UTF8.self)) } ?? 0
            guard last < Int(UInt16.max) else { throw WeftError(ENOSPC, "no ids left under \(counter)") }
            let next = UInt16(last + 1)
            let won = try etcd.transaction(
                compare: [EtcdClient.Compare(key: counter, modRevision: count?.modRevision ?? 0),
                          EtcdClient.Compare(key: claim, createRevision: 0)],
                puts: [(counter, Data(String(next).utf8), 0), (claim, try JSONEncoder().encode(IDRecord(id: next)), 0)])
            if won { return next }
        }
        throw WeftError(EAGAIN, "could not take an id under \(counter): too much contention")
    }

    /// Records a new volume homed at `home`. EEXIST if the name is taken.
    public static func createVolume(etcd: EtcdClient, keys: ClusterKeys, name: String, home: String,
                                    chunkSizeBytes: UInt32, compression: String) throws -> (VolumeRecord, Int64) {
        try ClusterNames.validateVolume(name)
        if try etcd.get(keys.volume(name)).0 != nil { throw WeftError(EEXIST, "volume '\(name)' exists") }
        let id = try allocateID(etcd: etcd, counter: keys.volumeIDCounter, claim: keys.root + "volume-ids/" + name)
        let record = VolumeRecord(name: name, id: id, home: home, epoch: 1, chunkSizeBytes: chunkSizeBytes,
                                  compression: compression, createdNs: Int64(Date().timeIntervalSince1970 * 1e9))
        guard try etcd.create(keys.volume(name), try JSONEncoder().encode(record)) else {
            throw WeftError(EEXIST, "volume '\(name)' exists")
        }
        let (_, revision) = try etcd.get(keys.volume(name))
        return (record, revision)
    }
}
