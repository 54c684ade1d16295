#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CWeftSupport
import WeftProto

/// Stored-block spans a hub keeps in memory it allocated itself, least recently used evicted
/// first, bounded by bytes (SPEC.md §4, Hub read cache). Concurrent readers of one span share
/// one read of it.
final class SpanCache: @unchecked Sendable {
    /// What names a span: objects are immutable, so a key's bytes never change. The file's
    /// device, inode and change time tell a replaced object file (the same bytes, perhaps
    /// another layout) from the one read, even where the file system reuses the inode.
    struct Key: Hashable {
        var id: SliceID
        var device: UInt64
        var inode: UInt64
        var changeNs: Int64
        var fileOffset: Int
        var byteCount: Int
    }

    /// One span's memory: its bytes, then the zero 4-byte trailer of a `readBlocks` response.
    /// When the last holder (the cache, a send) lets go, the memory goes back to the cache for
    /// the next miss (memory already touched), or is freed once the cache is gone.
    final class Span: @unchecked Sendable {
        let base: UnsafeMutableRawPointer
        let capacity: Int
        let byteCount: Int
        fileprivate weak var home: SpanCache?

        fileprivate init(base: UnsafeMutableRawPointer, capacity: Int, byteCount: Int, home: SpanCache) {
            self.base = base
            self.capacity = capacity
            self.byteCount = byteCount
            self.home = home
        }

        /// The span's bytes and the trailer.
        var bytesWithTrailer: UnsafeRawBufferPointer {
            UnsafeRawBufferPointer(start: base, count: byteCount + SpanCache.trailerBytes)
        }

        deinit {
            if let home { home.giveBack(base, capacity: capacity) } else { weft_bulk_free(base) }
        }
    }

    static let trailerBytes = 4
    static let alignment = 4096
    /// The transfer allocator's size classes (Sources/CWeftSupport/bulk_memory.c).
    static let classBytes = 256 << 10

    let boundBytes: Int
    private let lock = Lock()
    private enum Slot {
        case ready(Span)
        case loading
    }
    private var slots: [Key: Slot] = [:]
    /// The ready spans by recency, each counted at its capacity.
    private var recency = LeastRecentlyUsed<Key>()
    private var counters = SpanCacheCounters()
    /// Memory of spans no one holds any more, smallest first, for the next misses.
    private var free: [(base: UnsafeMutableRawPointer, capacity: Int)] = []
    private var freeBytes = 0
    /// Memory taken by loads in flight: counted against the bound until cached or given back.
    private var loadingBytes = 0
    /// Memory of spans let go since the last `drainLocked`, under `returnLock` alone: a span's
    /// last release may come anywhere, `lock` held or not (Swift may end a lifetime early, inside
    /// a critical section), so giving memory back never takes `lock`.
    private let returnLock = Lock()
    private var returned: [(base: UnsafeMutableRawPointer, capacity: Int)] = []

    init(boundBytes: Int) {
        precondition(boundBytes > 0)
        self.boundBytes = boundBytes
    }

    deinit {
        for block in free { weft_bulk_free(block.base) }
        for block in returned { weft_bulk_free(block.base) }
    }

    var statistics: SpanCacheCounters {
        var unkept: [UnsafeMutableRawPointer] = []
        defer { unkept.forEach { weft_bulk_free($0) } }
        return lock.withLock {
            drainLocked(unkept: &unkept)
            var copy = counters
            copy.heldBytes = heldBytesLocked
            copy.spans = recency.count
            copy.freeBytes = freeBytes
            return copy
        }
    }

    /// Memory a span of `byteCount` bytes needs: its page-multiple cover with room for the
    /// trailer (an O_DIRECT read of the cover fits).
    static func capacity(byteCount: Int) -> Int {
        (byteCount + trailerBytes + alignment - 1) / alignment * alignment
    }

    /// Fresh memory for that need: the allocator's class, so later spans of other sizes in the
    /// class can reuse it.
    static func classCapacity(_ need: Int) -> Int {
        (need + classBytes - 1) / classBytes * classBytes
    }

    /// Whether a span of `byteCount` bytes is small enough to keep: at most an eighth of the
    /// bound. Larger ones are not the cache's (the caller sends them from the file).
    func keeps(byteCount: Int) -> Bool {
        Self.classCapacity(Self.capacity(byteCount: byteCount)) <= boundBytes / 8
    }

    private var heldBytesLocked: Int { Int(recency.totalBytes) }

    /// The span of `key` (one `keeps` accepts): from the cache, or read by `read` into
    /// page-aligned memory of at least `capacity(byteCount:)` bytes (true: the span's bytes are
    /// in place). One reader of a key reads; the others wait for it. nil when the read failed
    /// (nothing is cached; the caller serves the span another way) or memory could not be had.
    func span(_ key: Key, read: (UnsafeMutableRawPointer) -> Bool) -> Span? {
        let found: Span? = lock.withLock {
            var waited = false
            while true {
                switch slots[key] {
                case .ready(let span):
                    if !waited { counters.hits += 1 }
                    recency.touch(key)
                    return span
                case .loading:
                    if !waited { counters.sharedWaits += 1 }
                    waited = true
                    lock.wait()
                case nil:
                    slots[key] = .loading
                    counters.misses += 1
                    return nil
                }
            }
        }
        if let found { return found }
        var loaded: Span?
        var reserved = 0
        var readFailed = false
        if let (base, capacity) = memory(for: key.byteCount) {
            reserved = capacity
            let span = Span(base: base, capacity: capacity, byteCount: key.byteCount, home: self)
            if read(base) {
                (base + key.byteCount).storeBytes(of: Int32(0), as: Int32.self)
                loaded = span
            } else {
                readFailed = true
            }
        }
        var unkept: [UnsafeMutableRawPointer] = []
        defer { unkept.forEach { weft_bulk_free($0) } }
        lock.withLock {
            loadingBytes -= reserved
            if let loaded {
                slots[key] = .ready(loaded)
                recency.insert(key, bytes: UInt64(loaded.capacity))
                evictSpansLocked(reserving: 0)
                drainLocked(unkept: &unkept)
                trimFreeLocked(reserving: 0, unkept: &unkept)
            } else {
                slots[key] = nil
                if readFailed { counters.failedReads += 1 }
            }
            lock.broadcast()
        }
        return loaded
    }

    /// Memory for a span of `byteCount` bytes, counted in `loadingBytes`: the smallest free block
    /// that holds it (at most twice its need or its class), else fresh from the transfer
    /// allocator, after evicting the least recently used spans to make room under the bound.
    private func memory(for byteCount: Int) -> (UnsafeMutableRawPointer, Int)? {
        let need = Self.capacity(byteCount: byteCount)
        let fresh = Self.classCapacity(need)
        var unkept: [UnsafeMutableRawPointer] = []
        defer { unkept.forEach { weft_bulk_free($0) } }
        var reservedFresh = false
        let reused: (UnsafeMutableRawPointer, Int)? = lock.withLock {
            drainLocked(unkept: &unkept)
            if let block = takeFreeLocked(need: need, fresh: fresh) { return block }
            // Evicted spans that no send holds come back into the free memory, to be taken.
            evictSpansLocked(reserving: fresh)
            drainLocked(unkept: &unkept)
            if let block = takeFreeLocked(need: need, fresh: fresh) {
                trimFreeLocked(reserving: 0, unkept: &unkept)
                return block
            }
            trimFreeLocked(reserving: fresh, unkept: &unkept)
            // Loads in flight hold the rest of the bound: this span goes from the file.
            guard heldBytesLocked + loadingBytes + fresh <= boundBytes else {
                counters.overBound += 1
                return nil
            }
            loadingBytes += fresh
            reservedFresh = true
            return nil
        }
        if let reused { return reused }
        guard reservedFresh else { return nil }
        guard let base = weft_bulk_allocate(fresh) else {
            lock.withLock { loadingBytes -= fresh }
            return nil
        }
        lock.withLock { counters.freshBlocks += 1 }
        return (base, fresh)
    }

    private func takeFreeLocked(need: Int, fresh: Int) -> (UnsafeMutableRawPointer, Int)? {
        let largest = max(2 * need, fresh)
        guard let index = free.firstIndex(where: { $0.capacity >= need && $0.capacity <= largest }) else { return nil }
        let block = free.remove(at: index)
        freeBytes -= block.capacity
        loadingBytes += block.capacity
        counters.reusedBlocks += 1
        return (block.base, block.capacity)
    }

    /// Takes back the memory of a span no one holds, for `drainLocked`. Never takes `lock`.
    fileprivate func giveBack(_ base: UnsafeMutableRawPointer, capacity: Int) {
        returnLock.withLock { returned.append((base, capacity)) }
    }

    /// Moves the memory given back into the free memory (kept smallest first) while everything
    /// stays within the bound; the rest goes to `unkept`, freed by the caller after unlocking.
    private func drainLocked(unkept: inout [UnsafeMutableRawPointer]) {
        let blocks: [(base: UnsafeMutableRawPointer, capacity: Int)] = returnLock.withLock {
            defer { returned.removeAll(keepingCapacity: true) }
            return returned
        }
        for block in blocks {
            guard heldBytesLocked + loadingBytes + freeBytes + block.capacity <= boundBytes else {
                unkept.append(block.base)
                continue
            }
            let index = free.firstIndex(where: { $0.capacity >= block.capacity }) ?? free.count
            free.insert(block, at: index)
            freeBytes += block.capacity
        }
    }

    /// Evicts the least recently used spans until the spans held, the loads in flight and
    /// `reserving` bytes fit the bound. An evicted span's memory comes back (`giveBack`) now,
    /// or when a send that still holds it ends.
    private func evictSpansLocked(reserving: Int) {
        while heldBytesLocked + loadingBytes + reserving > boundBytes, let victim = recency.leastRecent() {
            recency.remove(victim)
            slots[victim] = nil
        }
    }

    /// Lets go of free memory, smallest first (large blocks serve more sizes), until the spans
    /// held, the loads in flight, the free memory and `reserving` bytes fit the bound.
    private func trimFreeLocked(reserving: Int, unkept: inout [UnsafeMutableRawPointer]) {
        while heldBytesLocked + loadingBytes + freeBytes + reserving > boundBytes, !free.isEmpty {
            let block = free.removeFirst()
            freeBytes -= block.capacity
            unkept.append(block.base)
        }
    }

    /// Drops every span (their memory goes when their sends end) and the free memory.
    func removeAll() {
        var unkept: [UnsafeMutableRawPointer] = []
        defer { unkept.forEach { weft_bulk_free($0) } }
        lock.withLock {
            slots = slots.filter { if case .loading = $0.value { return true } else { return false } }
            recency = LeastRecentlyUsed<Key>()
            drainLocked(unkept: &unkept)
            unkept += free.map(\.base)
            free.removeAll()
            freeBytes = 0
        }
    }
}

/// What a hub read cache did so far (SPEC.md §4, Hub read cache).
public struct SpanCacheCounters: Sendable, Equatable {
    public var hits: UInt64 = 0
    public var misses: UInt64 = 0
    /// Readers that waited for another reader's read of the same span.
    public var sharedWaits: UInt64 = 0
    /// Reads that failed (the span was then served from the file).
    public var failedReads: UInt64 = 0
    /// Misses sent from the file because loads in flight held the rest of the bound.
    public var overBound: UInt64 = 0
    /// Bytes of the spans held now (their memory, trailer and class rounding included).
    public var heldBytes: Int = 0
    public var spans: Int = 0
    /// Memory of spans no one holds, kept for the next misses.
    public var freeBytes: Int = 0
    /// Misses served from that memory, and from fresh memory.
    public var reusedBlocks: UInt64 = 0
    public var freshBlocks: UInt64 = 0
}
