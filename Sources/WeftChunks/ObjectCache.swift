#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WeftProto

/// An open, validated chunk object: its file descriptor and decoded block table.
///
/// Shared by concurrent readers; the descriptor is closed when the last reference goes, so an
/// evicted object stays readable by whoever still holds it.
final class OpenObject: @unchecked Sendable {
    let id: SliceID
    let fd: Int32
    let layout: ChunkLayout
    /// Device, inode and change time (ns) of the file open at `fd` (all 0 if `fstat` failed).
    let device: UInt64
    let inode: UInt64
    let changeNs: Int64
    private let directLock = Lock()
    /// O_DIRECT descriptor for aligned reads: -1 not opened yet, -2 refused.
    private var directFD: Int32 = -1

    init(id: SliceID, fd: Int32, layout: ChunkLayout) {
        self.id = id
        self.fd = fd
        self.layout = layout
        var info = stat()
        if fstat(fd, &info) == 0 {
            device = UInt64(info.st_dev)
            inode = UInt64(info.st_ino)
            changeNs = Int64(info.st_ctim.tv_sec) * 1_000_000_000 + Int64(info.st_ctim.tv_nsec)
        } else {
            device = 0
            inode = 0
            changeNs = 0
        }
    }

    /// Whether this object's O_DIRECT descriptor was refused for good (another file at its path,
    /// or O_DIRECT not allowed): its reads go through `fd` and the page cache.
    var directRefused: Bool { directLock.withLock { directFD == -2 } }

    /// The object's O_DIRECT descriptor, opened by `open` (by path) on first use; nil if it
    /// cannot be, or if the path now names another file than `fd` (the object was replaced
    /// meanwhile, `rewriteJournaled`, perhaps with another layout: SPEC.md §4, Hub read cache):
    /// then this object reads through `fd` and the page cache for good.
    func directDescriptor(_ open: () -> Int32) -> Int32? {
        directLock.withLock {
            if directFD == -1 {
                let opened = open()
                if opened >= 0 {
                    var info = stat()
                    let same = inode != 0 && fstat(opened, &info) == 0 && UInt64(info.st_dev) == device
                        && UInt64(info.st_ino) == inode
                    if same {
                        directFD = opened
                    } else {
                        close(opened)
                        directFD = -2
                    }
                } else {
                    directFD = max(opened, -2)
                }
            }
            return directFD >= 0 ? directFD : nil
        }
    }

    deinit {
        close(fd)
        if directFD >= 0 { close(directFD) }
    }
}

/// A bounded cache of open objects, least recently used evicted first.
///
/// Split into `shardCount` shards by id, each with its own short lock, so concurrent readers
/// rarely contend. Holds at most `shardCount * entriesPerShard` objects (one descriptor and
/// one block table each: at most 24 bytes per 64 KiB block).
final class ObjectCache: @unchecked Sendable {
    static let shardCount = 16

    private final class Shard {
        struct Slot {
            var object: OpenObject
            var lastUse: UInt64
        }
        let lock = Lock()
        var slots: [SliceID: Slot] = [:]
        var clock: UInt64 = 0
        /// Bumped by every removal, so an insert that raced with a delete is dropped.
        var removals: UInt64 = 0
    }

    let capacity: Int
    private let entriesPerShard: Int
    private let shards: [Shard]

    init(capacity: Int) {
        precondition(capacity >= Self.shardCount, "cache capacity below shard count")
        self.capacity = capacity
        entriesPerShard = capacity / Self.shardCount
        shards = (0..<Self.shardCount).map { _ in Shard() }
    }

    @inline(__always) private func shard(_ id: SliceID) -> Shard {
        // Mix the id so sequential ids spread over shards.
        shards[Int(truncatingIfNeeded: (id &* 0x9E37_79B9_7F4A_7C15) >> 60) & (Self.shardCount - 1)]
    }

    /// The cached object, or nil with a token to pass to `insert` after opening it.
    func lookup(_ id: SliceID) -> (OpenObject?, token: UInt64) {
        let shard = shard(id)
        return shard.lock.withLock {
            shard.clock &+= 1
            if let slot = shard.slots[id] {
                shard.slots[id]!.lastUse = shard.clock
                return (slot.object, shard.removals)
            }
            return (nil, shard.removals)
        }
    }

    /// Caches `object` unless a removal happened since `lookup` returned `token`; returns the
    /// object to use (an already cached one wins a race between two openers).
    func insert(_ object: OpenObject, token: UInt64) -> OpenObject {
        let shard = shard(object.id)
        var evicted: OpenObject?
        let result: OpenObject = shard.lock.withLock {
            guard shard.removals == token else { return object }
            shard.clock &+= 1
            if let existing = shard.slots[object.id] { return existing.object }
            if shard.slots.count >= entriesPerShard {
                var oldest: (SliceID, UInt64)?
                for (id, slot) in shard.slots where oldest == nil || slot.lastUse < oldest!.1 {
                    oldest = (id, slot.lastUse)
                }
                evicted = shard.slots.removeValue(forKey: oldest!.0)?.object
            }
            shard.slots[object.id] = Shard.Slot(object: object, lastUse: shard.clock)
            return object
        }
        withExtendedLifetime(evicted) {}  // an evicted descriptor closes here, outside the lock
        return result
    }

    func remove(_ id: SliceID) {
        let shard = shard(id)
        let removed: OpenObject? = shard.lock.withLock {
            shard.removals &+= 1
            return shard.slots.removeValue(forKey: id)?.object
        }
        withExtendedLifetime(removed) {}  // closes outside the lock
    }

    var count: Int { shards.reduce(0) { total, shard in total + shard.lock.withLock { shard.slots.count } } }
}
