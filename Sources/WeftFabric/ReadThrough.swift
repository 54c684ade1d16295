import Foundation
import Logging
import WeftChunks
import WeftProto

/// A hub's read-through cache of objects held by other hubs (SPEC.md §12.5).
///
/// Guarantees:
/// - single flight: however many readers miss the same object at once, it is fetched once;
/// - a fetched copy is kept only after its header and every block's CRC32C check out, so a
///   reader never gets wrong bytes; a bad or unreachable holder is followed by the next one,
///   and when none is left the read fails with EIO (ENOENT if every holder said it has no copy);
/// - the copies in the volumes' `cache/` stores take at most `capacityBytes` together; the
///   least recently read are deleted first. Objects in `chunks/` are never touched.
public final class ReadThrough: @unchecked Sendable {
    /// Where a fetched object is kept, and where its holders are.
    struct Target {
        var volumeID: UInt16
        var cache: ChunkStore
        /// Hubs to try in order, as (hub id, address); resolved from the cluster map.
        var sources: [(hub: UInt16, address: String?)]
    }

    public let capacityBytes: UInt64
    let logger: Logger
    let connectPeer: (String) throws -> HubAPI

    private let lock = NSLock()
    private var lru = LeastRecentlyUsed<SliceID>()
    private var stores: [SliceID: ChunkStore] = [:]
    private var flights: [SliceID: Flight] = [:]
    private var peers: [String: HubAPI] = [:]
    private var fetchCount: UInt64 = 0
    private var fetchedBytesCount: UInt64 = 0
    private var evictionCount: UInt64 = 0

    /// Most peer connections kept open (one per peer address).
    static let peersMax = 256

    private final class Flight {
        let done = NSCondition()
        var finished = false
        var failure: Error?
    }

    init(capacityBytes: UInt64, connectPeer: @escaping (String) throws -> HubAPI, logger: Logger) {
        self.capacityBytes = capacityBytes
        self.connectPeer = connectPeer
        self.logger = logger
    }

    /// Objects fetched from other hubs (successfully) since start-up.
    public var fetches: UInt64 { lock.withLock { fetchCount } }
    /// Object file bytes fetched from other hubs since start-up.
    public var fetchedBytes: UInt64 { lock.withLock { fetchedBytesCount } }
    /// Cached objects deleted to stay within `capacityBytes`.
    public var evictions: UInt64 { lock.withLock { evictionCount } }
    /// Bytes of cached objects now.
    public var cachedBytes: UInt64 { lock.withLock { lru.totalBytes } }

    /// Counts the objects a cache store holds at start-up, oldest (mtime) least recent, and
    /// evicts beyond the bound.
    func adopt(_ store: ChunkStore) throws {
        var found: [(SliceID, UInt64, Int64)] = []
        try store.forEach { id, bytes, modifiedNs in found.append((id, bytes, modifiedNs)) }
        found.sort { $0.2 < $1.2 }
        lock.withLock {
            for (id, bytes, _) in found {
                lru.insert(id, bytes: bytes)
                stores[id] = store
            }
        }
        evictBeyondBound(keeping: nil)
    }

    /// Marks a read from the cache.
    func touched(_ id: SliceID) {
        lock.withLock { _ = lru.touch(id) }
    }

    /// Brings object `id` into `target.cache`, fetching it at most once at a time.
    func fetch(_ id: SliceID, _ target: Target) throws {
        let (flight, leader): (Flight, Bool) = lock.withLock {
            if let running = flights[id] { return (running, false) }
            let flight = Flight()
            flights[id] = flight
            return (flight, true)
        }
        if !leader {
            flight.done.lock()
            while !flight.finished { flight.done.wait() }
            flight.done.unlock()
            if let failure = flight.failure { throw failure }
            return
        }
        var failure: Error?
        do {
            if !target.cache.exists(id: id) { try fetchFromHolders(id, target) }
        } catch {
            failure = error
        }
        lock.withLock { _ = flights.removeValue(forKey: id) }
        flight.done.lock()
        flight.finished = true
        flight.failure = failure
        flight.done.broadcast()
        flight.done.unlock()
        if let failure { throw failure }
    }

    private func fetchFromHolders(_ id: SliceID, _ target: Target) throws {
        var reasons: [String] = []
        var everyHolderLacksIt = !target.sources.isEmpty
        for source in target.sources {
            guard let address = source.address else {
                reasons.append("hub \(source.hub) is down")
                everyHolderLacksIt = false
                continue
            }
            do {
                let file = try download(id, from: address)
                do {
                    try target.cache.importObject(id: id, file: file)
                } catch let error as WeftError where error.errno == EEXIST {
                    // Already kept (a concurrent import after an eviction race): use it.
                }
                lock.withLock {
                    fetchCount += 1
                    fetchedBytesCount += UInt64(file.count)
                    lru.insert(id, bytes: UInt64(file.count))
                    stores[id] = target.cache
                }
                logger.debug("fetched chunk object", metadata: ["object": "\(hex(id))", "from": "\(source.hub)",
                                                                "bytes": "\(file.count)"])
                evictBeyondBound(keeping: id)
                return
            } catch {
                let weftError = error as? WeftError
                if weftError?.errno != ENOENT { everyHolderLacksIt = false }
                logger.warning("chunk object copy refused, trying the next holder",
                               metadata: ["object": "\(hex(id))", "volume": "\(target.volumeID)",
                                          "holder": "\(source.hub)", "error": "\(error)"])
                reasons.append("hub \(source.hub): \(weftError?.message ?? "\(error)")")
            }
        }
        if everyHolderLacksIt {
            throw WeftError(ENOENT, "chunk \(hex(id)) missing at every holder")
        }
        logger.error("no good copy of chunk object \(hex(id)) of volume \(target.volumeID): \(reasons.joined(separator: "; "))")
        throw WeftError(EIO, "no good copy of chunk \(hex(id)) at any holder")
    }

    /// The whole file of object `id` from the hub at `address`, in pieces of at most
    /// `Limits.fetchPieceMaxBytes`.
    private func download(_ id: SliceID, from address: String) throws -> [UInt8] {
        let peer = try self.peer(address)
        let piece = UInt32(Limits.fetchPieceMaxBytes)
        let (fileBytes, first) = try peer.fetchObject(id: id, offset: 0, length: piece)
        // Largest valid file: the largest header, a page of padding, 64 MiB of payload.
        guard Int(fileBytes) <= Limits.chunkSizeMaxBytes + 16_384 + 4096 else {
            throw WeftError(EIO, "holder reports a \(fileBytes)-byte file for chunk \(hex(id))")
        }
        var file = first
        file.reserveCapacity(Int(fileBytes))
        while file.count < Int(fileBytes) {
            let (again, more) = try peer.fetchObject(id: id, offset: UInt32(file.count), length: piece)
            guard again == fileBytes, !more.isEmpty else {
                throw WeftError(EIO, "chunk \(hex(id)) changed length at its holder while fetched")
            }
            file.append(contentsOf: more)
        }
        guard file.count == Int(fileBytes) else { throw WeftError(EIO, "holder sent too many bytes of chunk \(hex(id))") }
        return file
    }

    /// The connection to the hub at `address` (one per address, shared).
    func peer(_ address: String) throws -> HubAPI {
        if let known = lock.withLock({ peers[address] }) { return known }
        let made = try connectPeer(address)
        return lock.withLock {
            if let known = peers[address] { return known }
            if peers.count >= Self.peersMax { peers.removeAll() }
            peers[address] = made
            return made
        }
    }

    /// Deletes least recently read cached objects until the total is within the bound.
    private func evictBeyondBound(keeping: SliceID?) {
        while true {
            let victim: (SliceID, ChunkStore)? = lock.withLock {
                guard lru.totalBytes > capacityBytes, let id = lru.leastRecent(keeping: keeping),
                      let store = stores.removeValue(forKey: id) else { return nil }
                lru.remove(id)
                evictionCount += 1
                return (id, store)
            }
            guard let (id, store) = victim else { return }
            do { try store.delete(id: id) } catch {
                logger.error("cannot evict cached chunk object \(hex(id)): \(error)")
            }
        }
    }

    /// Deletes the cached copy of `id`, if any (the object is garbage at its home).
    func drop(_ id: SliceID) throws {
        let store: ChunkStore? = lock.withLock {
            lru.remove(id)
            return stores.removeValue(forKey: id)
        }
        try store?.delete(id: id)
    }

    /// Forgets an object deleted from its cache store by someone else (a damaged copy).
    func forget(_ id: SliceID) {
        lock.withLock {
            lru.remove(id)
            stores[id] = nil
        }
    }
}
