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
    /// device and inode tell a replaced object file (same bytes, perhaps another layout) apart.
    struct Key: Hashable {
        var id: SliceID
        var device: UInt64
        var inode: UInt64
        var fileOffset: Int
        var byteCount: Int
    }

    /// One span's memory: its bytes, then the zero 4-byte trailer of a `readBlocks` response.
    /// When the last holder (the cache, a send) lets go, the memory goes back to the cache's
    /// free memory for the next miss (memory already touched), or to the transfer-buffer
    /// allocator when that would pass the bound.
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

    let boundBytes: Int
    private let lock = Lock()
    private enum Slot {
        case ready(Node)
        case loading
    }
    private final class Node {
        let key: Key
        let span: Span
        var newer: Node?
        weak var older: Node?
        init(key: Key, span: Span) {
            self.key = key
            self.span = span
        }
    }
    private var slots: [Key: Slot] = [:]
    /// Most recently used first: `newest` … `oldest`, linked by `older` / `newer`.
    private var newest: Node?
    private var oldest: Node?
    private var counters = SpanCacheCounters()
    /// Memory of spans no one holds any more, smallest first, for the next misses.
    private var free: [(base: UnsafeMutableRawPointer, capacity: Int)] = []
    private var freeBytes = 0
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
        lock.withLock {
            drainLocked()
            var copy = counters
            copy.freeBytes = freeBytes
            return copy
        }
    }

    /// Memory a span of `byteCount` bytes takes: its page-multiple cover with room for the
    /// trailer (an O_DIRECT read of the cover fits).
    static func capacity(byteCount: Int) -> Int {
        (byteCount + trailerBytes + alignment - 1) / alignment * alignment
    }

    /// The span of `key`: from the cache, or read by `read` into fresh page-aligned memory of
    /// `capacity(byteCount:)` bytes (true: the span's bytes are in place). One reader of a key
    /// reads; others wait for it. nil when the read failed (nothing is cached; the caller serves
    /// the span another way) or memory could not be had.
    func span(_ key: Key, read: (UnsafeMutableRawPointer) -> Bool) -> Span? {
        let found: Span? = lock.withLock {
            var waited = false
            while true {
                switch slots[key] {
                case .ready(let node):
                    if !waited { counters.hits += 1 }
                    touchLocked(node)
                    return node.span
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
        if let (base, capacity) = memory(for: key.byteCount) {
            let span = Span(base: base, capacity: capacity, byteCount: key.byteCount, home: self)
            if read(base) {
                (base + key.byteCount).storeBytes(of: Int32(0), as: Int32.self)
                loaded = span
            }
        }
        lock.withLock {
            if let loaded, loaded.capacity <= boundBytes / 8 {
                let node = Node(key: key, span: loaded)
                slots[key] = .ready(node)
                linkNewestLocked(node)
                counters.heldBytes += loaded.capacity
                counters.spans += 1
                evictSpansLocked(keepingFree: 0)
                drainLocked()
                trimFreeLocked(reserving: 0)
            } else {
                slots[key] = nil
                if loaded == nil { counters.failedReads += 1 }
            }
            lock.broadcast()
        }
        return loaded
    }

    /// Memory for a span of `byteCount` bytes: the smallest free block that holds it (at most
    /// twice its need), else fresh from the transfer-buffer allocator, after evicting the least
    /// recently used spans to make room under the bound (not for a span too large to keep).
    private func memory(for byteCount: Int) -> (UnsafeMutableRawPointer, Int)? {
        let need = Self.capacity(byteCount: byteCount)
        let reused: (UnsafeMutableRawPointer, Int)? = lock.withLock {
            let kept = need <= boundBytes / 8
            if kept { evictSpansLocked(keepingFree: need) }
            drainLocked()
            var taken: (base: UnsafeMutableRawPointer, capacity: Int)?
            if let index = free.firstIndex(where: { $0.capacity >= need && $0.capacity <= 2 * need }) {
                taken = free.remove(at: index)
                freeBytes -= taken!.capacity
                counters.reusedBlocks += 1
            }
            trimFreeLocked(reserving: kept ? taken?.capacity ?? need : 0)
            return taken.map { ($0.base, $0.capacity) }
        }
        if let reused { return reused }
        // Fresh memory in the allocator's 256 KiB classes, so that a later span of another size
        // in the same class can reuse it.
        let capacity = (need + (256 << 10) - 1) / (256 << 10) * (256 << 10)
        guard let base = weft_bulk_allocate(capacity) else { return nil }
        lock.withLock { counters.freshBlocks += 1 }
        return (base, capacity)
    }

    /// Takes back the memory of a span no one holds, for `drainLocked`. Never takes `lock`.
    fileprivate func giveBack(_ base: UnsafeMutableRawPointer, capacity: Int) {
        returnLock.withLock { returned.append((base, capacity)) }
    }

    /// Moves the memory given back into the free memory while the spans held and the free memory
    /// stay within the bound (smallest first kept in order), and frees the rest.
    private func drainLocked() {
        let blocks: [(base: UnsafeMutableRawPointer, capacity: Int)] = returnLock.withLock {
            defer { returned.removeAll(keepingCapacity: true) }
            return returned
        }
        for block in blocks {
            guard counters.heldBytes + freeBytes + block.capacity <= boundBytes else {
                weft_bulk_free(block.base)
                continue
            }
            let index = free.firstIndex(where: { $0.capacity >= block.capacity }) ?? free.count
            free.insert(block, at: index)
            freeBytes += block.capacity
        }
    }

    /// Drops every span (their memory goes when their sends end).
    func removeAll() {
        lock.withLock {
            slots = slots.filter { if case .loading = $0.value { return true } else { return false } }
            var node = newest
            while let current = node {
                node = current.older
                current.newer = nil
                current.older = nil
            }
            newest = nil
            oldest = nil
            counters.heldBytes = 0
            counters.spans = 0
            drainLocked()
            for block in free { weft_bulk_free(block.base) }
            free.removeAll()
            freeBytes = 0
        }
    }

    private func touchLocked(_ node: Node) {
        guard newest !== node else { return }
        unlinkLocked(node)
        linkNewestLocked(node)
    }

    private func linkNewestLocked(_ node: Node) {
        node.older = newest
        node.newer = nil
        newest?.newer = node
        newest = node
        if oldest == nil { oldest = node }
    }

    private func unlinkLocked(_ node: Node) {
        let newer = node.newer
        let older = node.older
        if let newer { newer.older = older } else { newest = older }
        if let older { older.newer = newer } else { oldest = newer }
        node.newer = nil
        node.older = nil
    }

    /// Evicts the least recently used spans until the spans held leave `keepingFree` bytes of
    /// the bound; their memory comes back (`giveBack`) now, or when a send holding one ends.
    private func evictSpansLocked(keepingFree: Int) {
        while counters.heldBytes + keepingFree > boundBytes, let victim = oldest {
            unlinkLocked(victim)
            slots[victim.key] = nil
            counters.heldBytes -= victim.span.capacity
            counters.spans -= 1
        }
    }

    /// Frees kept memory, smallest first (large blocks serve more sizes), until the spans held,
    /// the memory kept and `reserving` bytes fit the bound.
    private func trimFreeLocked(reserving: Int) {
        while counters.heldBytes + freeBytes + reserving > boundBytes, !free.isEmpty {
            let block = free.removeFirst()
            freeBytes -= block.capacity
            weft_bulk_free(block.base)
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
    /// Bytes of the spans held now (page-rounded, trailer included).
    public var heldBytes: Int = 0
    public var spans: Int = 0
    /// Memory of spans no one holds, kept for the next misses.
    public var freeBytes: Int = 0
    /// Misses served from that memory, and from fresh memory.
    public var reusedBlocks: UInt64 = 0
    public var freshBlocks: UInt64 = 0
}
