#if canImport(Glibc)
import Glibc
#endif
import CWeftSupport
import Foundation
import WeftProto

/// Page-aligned memory that one fetch reads into; the blocks cut from it share it, and it goes
/// back to its `SlabPool` when the last of them goes.
public final class Slab: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    /// Usable bytes: what the fetch asked for (the memory behind it may be larger, see `SlabPool`).
    public let capacity: Int
    /// The memory behind it: pooled slabs (1 MiB and more) are whole MiB, all of it touched.
    public let memoryBytes: Int
    private let pool: SlabPool

    public init(capacity: Int, pool: SlabPool = .shared) {
        self.capacity = capacity
        self.pool = pool
        (pointer, memoryBytes) = pool.take(capacity)
    }

    deinit { pool.give(pointer, memoryBytes) }
}

/// The memory behind large slabs, kept for reuse (SPEC.md §7, Slab memory). On these VMs the
/// first touch of a page costs several times a copy (the host populates it), and even a page
/// the process freed a moment ago costs a fault and a clear, so the cache refills reused memory.
///
/// Slabs of at least `pooledMinBytes` are sized in whole MiB and pooled by size; a take reuses
/// only a slab of its own size (a larger one would hold memory the cache does not count).
/// Memory is kept while the slabs in use plus the pooled ones stay within `budgetBytes`, which
/// a block cache raises to its bound plus `inFlightAllowance`: the slabs of fetches in flight,
/// which a cache at its bound keeps on top of what it counts. A take that misses the pool
/// allocates, and first frees pooled memory (smallest first) if the new slab would pass the
/// budget. One pool (`shared`) serves a process.
public final class SlabPool: @unchecked Sendable {
    public static let shared = SlabPool(budgetBytes: 64 << 20)
    static let pooledMinBytes = 1 << 20

    /// What slabs in use may take beyond a block cache's bound of `cacheBytes`: fetches in
    /// flight (read-ahead runs 8 objects at once; the cache counts a slab whole while it holds
    /// any block of it). Until 2026-12-07 the budget was the bound alone, and a cache at its
    /// bound always had more slabs in use than that: every freed slab was unmapped and every
    /// fetch read into fresh memory (SPEC.md §7, Slab memory).
    public static func inFlightAllowance(cacheBytes: Int) -> Int { max(64 << 20, cacheBytes / 8) }

    private let lock = NSLock()
    private var free: [Int: [UnsafeMutableRawPointer]] = [:]
    private var pooledBytes = 0
    private var liveBytes = 0
    private var budget: Int
    private var allocated = 0

    public init(budgetBytes: Int) {
        budget = budgetBytes
    }

    deinit { drain() }

    /// What the pool may keep, in bytes, together with the slabs in use.
    public var budgetBytes: Int { lock.withLock { budget } }

    /// Raises the budget to `bytes` (block caches call it with their bound; several caches on
    /// one pool share the largest).
    public func reserve(_ bytes: Int) {
        lock.withLock { budget = max(budget, bytes) }
    }

    /// Pooled bytes, and bytes of pooled-size slabs in use.
    public var usage: (pooled: Int, live: Int) { lock.withLock { (pooledBytes, liveBytes) } }

    /// Pooled-size slabs allocated (not taken from the pool) since the pool was made.
    public var allocations: Int { lock.withLock { allocated } }

    /// Frees every pooled slab.
    public func drain() {
        lock.lock()
        let all = free
        free = [:]
        pooledBytes = 0
        lock.unlock()
        for (size, pointers) in all { pointers.forEach { LargePages.unmap($0, size) } }
    }

    /// Memory for `capacity` bytes and the size behind it.
    func take(_ capacity: Int) -> (UnsafeMutableRawPointer, Int) {
        guard capacity >= Self.pooledMinBytes else {
            return (UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 4096), capacity)
        }
        let size = (capacity + Self.pooledMinBytes - 1) / Self.pooledMinBytes * Self.pooledMinBytes
        lock.lock()
        if let (pointer, found) = popFit(size) {
            liveBytes += found
            lock.unlock()
            return (pointer, found)
        }
        // Smallest first: whole-object fetches (the largest size) are the most common takes.
        var freed: [(UnsafeMutableRawPointer, Int)] = []
        while liveBytes + pooledBytes + size > budget, let smallest = free.keys.min() {
            freed.append((free[smallest]!.removeLast(), smallest))
            if free[smallest]!.isEmpty { free[smallest] = nil }
            pooledBytes -= smallest
        }
        liveBytes += size
        allocated += 1
        lock.unlock()
        for (pointer, bytes) in freed { LargePages.unmap(pointer, bytes) }
        // Pooled-size slabs are advised at once: an O_DIRECT read into them reaches the disk in
        // requests of 2 MiB pages rather than of at most 254 small ones, and costs a fault and
        // a pin per 2 MiB.
        let pointer = LargePages.map(size, advised: true, for: "slab memory")
        Self.populate(pointer, size)
        return (pointer, size)
    }

    /// Faults in fresh slab memory at once, on the thread that takes it (a fetch's), rather than
    /// page by page wherever it is first written: over the network that is the event loop's
    /// copy of the reply, which serves every connection's replies. Best effort (Linux 5.14+).
    static func populate(_ pointer: UnsafeMutableRawPointer, _ size: Int) {
        #if os(Linux)
        _ = madvise(pointer, size, Self.madvisePopulateWrite)
        #endif
    }

    /// MADV_POPULATE_WRITE (include/uapi/asm-generic/mman-common.h).
    static let madvisePopulateWrite: Int32 = 23

    func give(_ pointer: UnsafeMutableRawPointer, _ size: Int) {
        guard size >= Self.pooledMinBytes else { return pointer.deallocate() }
        lock.lock()
        liveBytes -= size
        if liveBytes + pooledBytes + size <= budget {
            free[size, default: []].append(pointer)
            pooledBytes += size
            lock.unlock()
            return
        }
        lock.unlock()
        LargePages.unmap(pointer, size)
    }

    /// A pooled slab of exactly `size` bytes. Called under `lock`.
    private func popFit(_ size: Int) -> (UnsafeMutableRawPointer, Int)? {
        guard let pointer = free[size]?.popLast() else { return nil }
        if free[size]!.isEmpty { free[size] = nil }
        pooledBytes -= size
        return (pointer, size)
    }
}

/// Immutable bytes of one cached block: a stretch of a `Slab`. Shared by readers.
public final class CachedBlock: @unchecked Sendable {
    public let slab: Slab
    public let pointer: UnsafeMutableRawPointer
    public let length: Int

    public init(slab: Slab, offset: Int, length: Int) {
        precondition(offset >= 0 && offset + length <= slab.capacity, "block outside its slab")
        self.slab = slab
        pointer = slab.pointer + offset
        self.length = length
    }

    public convenience init(copying source: UnsafeRawBufferPointer, pool: SlabPool = .shared) {
        let slab = Slab(capacity: source.count, pool: pool)
        if source.count > 0 { slab.pointer.copyMemory(from: source.baseAddress!, byteCount: source.count) }
        self.init(slab: slab, offset: 0, length: source.count)
    }

    public convenience init(zeros length: Int) {
        let slab = Slab(capacity: length)
        slab.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: max(length, 1))
        self.init(slab: slab, offset: 0, length: length)
    }

    /// A shared block of zeros for holes.
    public static let zeros = CachedBlock(zeros: Limits.blockSizeBytes)
}

/// The agent's memory cache of chunk-object blocks (`Limits.blockSizeBytes` each), keyed by
/// (object id, block index). Objects are immutable, so a cached block is never stale.
///
/// Bounded by `capacityBytes` of slab memory with LRU eviction (SPEC.md §7, Block cache): a
/// slab counts whole while any of its blocks is cached, since its memory goes only with the
/// last of them. A block read again whose slab is mostly evicted is moved into memory of its
/// own (`relocate`), so that a few hot blocks do not hold whole slabs. A block being fetched is
/// fetched once: other readers of the same block wait for that fetch (single flight).
public final class BlockCache: @unchecked Sendable {
    public struct Key: Hashable {
        public var object: SliceID
        public var block: UInt32
    }

    private final class Node {
        let key: Key
        var block: CachedBlock
        /// Hits since it was cached, and the cache's `clock` at its last use.
        var hits = 0
        var lastUse: UInt64 = 0
        var previous: Node?
        var next: Node?
        init(key: Key, block: CachedBlock) { self.key = key; self.block = block }
    }

    private let lock = NSCondition()
    private var nodes: [Key: Node] = [:]
    private var head: Node?   // most recently used
    private var tail: Node?   // least recently used
    private var inFlight: Set<Key> = []
    /// Per slab with a cached block: how many of its blocks are cached, their bytes, and the
    /// stretch of keys they were cached under: a fetch's slab holds blocks of one object, in
    /// order (`Reader.fetchBlocks`; other slabs hold one block), so the stretch finds them all.
    private struct SlabUse {
        var blocks = 0
        var bytes = 0
        var object: SliceID
        var first: UInt32
        var last: UInt32

        mutating func count(_ key: Key, bytes: Int) {
            blocks += 1
            self.bytes += bytes
            first = min(first, key.block)
            last = max(last, key.block)
        }
    }
    private var slabUse: [ObjectIdentifier: SlabUse] = [:]
    /// The slab memory the cached blocks hold: each slab with a cached block, whole.
    public private(set) var usedBytes = 0
    public let capacityBytes: Int
    /// Counters since the cache was made (`statistics`).
    private var relocations = 0
    private var hits = 0
    private var misses = 0
    private var readAheadClaims = 0
    private var evictions = 0
    /// Counts inserts and hits: a node's `lastUse` says how long ago, in blocks used, it was used.
    private var clock: UInt64 = 0

    /// Where the slabs of this cache's fetches come from.
    public let slabs: SlabPool

    public init(capacityBytes: Int, slabs: SlabPool = .shared) {
        self.capacityBytes = max(capacityBytes, Limits.blockSizeBytes * 4)
        self.slabs = slabs
        slabs.reserve(self.capacityBytes + SlabPool.inFlightAllowance(cacheBytes: self.capacityBytes))
    }

    public func get(_ key: Key) -> CachedBlock? {
        lock.lock()
        defer { lock.unlock() }
        guard let node = nodes[key] else { return nil }
        moveToFront(node)
        hit(node)
        return node.block
    }

    /// Claims the right to fetch `key`. Returns the cached block if present; nil with `claimed`
    /// true if the caller must fetch and then `fill` or `abandon`; waits while another thread fetches.
    public func claim(_ key: Key) -> (block: CachedBlock?, claimed: Bool) {
        lock.lock()
        defer { lock.unlock() }
        while true {
            if let node = nodes[key] {
                moveToFront(node)
                hit(node)
                return (node.block, false)
            }
            if !inFlight.contains(key) {
                inFlight.insert(key)
                misses += 1
                return (nil, true)
            }
            lock.wait()
        }
    }

    /// Claims `key` only if nobody has it or is fetching it (for prefetch, which never waits).
    public func tryClaim(_ key: Key) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if nodes[key] != nil || inFlight.contains(key) { return false }
        inFlight.insert(key)
        readAheadClaims += 1
        return true
    }

    /// Claims, in one pass under the lock, each block of `blocks` of `object` that nobody has or
    /// is fetching (prefetch and read-ahead, which never wait). Returns, per block in order,
    /// whether it was claimed.
    public func tryClaim(object: SliceID, blocks: ClosedRange<Int>) -> [Bool] {
        lock.lock()
        defer { lock.unlock() }
        return blocks.map { index in
            let key = Key(object: object, block: UInt32(index))
            if nodes[key] != nil || inFlight.contains(key) { return false }
            inFlight.insert(key)
            readAheadClaims += 1
            return true
        }
    }

    /// Claims the blocks of `object` from `first` on, up to `last`, while each is neither cached
    /// nor being fetched; stops at the first that is. Returns how many it claimed.
    public func tryClaimRun(object: SliceID, from first: Int, through last: Int) -> Int {
        lock.lock()
        defer { lock.unlock() }
        var index = first
        while index <= last {
            let key = Key(object: object, block: UInt32(index))
            if nodes[key] != nil || inFlight.contains(key) { break }
            inFlight.insert(key)
            index += 1
        }
        readAheadClaims += index - first
        return index - first
    }

    /// What `lookup` found for one block.
    public enum Lookup {
        case cached(CachedBlock)
        /// The caller now holds the claim: it must `fill` or `abandon` the block.
        case claimed
        /// Another thread is fetching it (`claim` waits for that).
        case busy
    }

    /// Looks up blocks `blocks` of `object` in one pass under the lock: cached ones are returned
    /// (and become most recently used), uncached ones nobody fetches are claimed for the caller.
    public func lookup(object: SliceID, blocks: ClosedRange<Int>) -> [Lookup] {
        lock.lock()
        defer { lock.unlock() }
        return blocks.map { index in
            let key = Key(object: object, block: UInt32(index))
            if let node = nodes[key] {
                moveToFront(node)
                hit(node)
                return .cached(node.block)
            }
            if inFlight.contains(key) { return .busy }
            inFlight.insert(key)
            misses += 1
            return .claimed
        }
    }

    public func fill(_ key: Key, _ block: CachedBlock) {
        fill([(key, block)])
    }

    /// Caches `block` unless `key` is cached or being fetched (bytes that came unasked, such as
    /// an `openLayout` reply's). Returns whether it was cached.
    @discardableResult
    public func offer(_ key: Key, _ block: CachedBlock) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard nodes[key] == nil, !inFlight.contains(key) else { return false }
        insertLocked(key, block)
        evictOverCapacity()
        return true
    }

    /// Ends the claims of `entries` with their blocks, under one lock, waking waiters once.
    public func fill(_ entries: [(Key, CachedBlock)]) {
        lock.lock()
        defer { lock.unlock() }
        for (key, block) in entries {
            inFlight.remove(key)
            guard nodes[key] == nil else { continue }
            insertLocked(key, block)
        }
        evictOverCapacity()
        lock.broadcast()
    }

    /// Caches `block` under `key`, most recently used. Called under `lock`.
    private func insertLocked(_ key: Key, _ block: CachedBlock) {
        let node = Node(key: key, block: block)
        clock += 1
        node.lastUse = clock
        nodes[key] = node
        insertAtFront(node)
        counted(node)
    }

    /// Counts the node's block in its slab's use, and the slab's memory if it is the slab's
    /// first. Called under `lock`.
    private func counted(_ node: Node) {
        let slab = ObjectIdentifier(node.block.slab)
        let key = node.key
        if slabUse[slab] == nil {
            usedBytes += node.block.slab.memoryBytes
            slabUse[slab] = SlabUse(object: key.object, first: key.block, last: key.block)
        }
        slabUse[slab]!.count(key, bytes: node.block.length)
    }

    /// Takes the node's block off its slab's use, and the slab's memory if it was the slab's
    /// last. Called under `lock`.
    private func uncounted(_ node: Node) {
        let slab = ObjectIdentifier(node.block.slab)
        guard let use = slabUse[slab] else { return }
        if use.blocks > 1 {
            slabUse[slab]!.blocks -= 1
            slabUse[slab]!.bytes -= node.block.length
        } else {
            slabUse[slab] = nil
            usedBytes -= node.block.slab.memoryBytes
        }
    }

    /// Drops the least recently used blocks while over capacity, except those of the most
    /// recently used block's slab: dropping some of them would free no memory, and all of them
    /// the block just cached (a fetch larger than the capacity stays whole, the only slab
    /// cached). Called under `lock`.
    private func evictOverCapacity() {
        guard let newest = head?.block.slab else { return }
        var candidate = tail
        while usedBytes > capacityBytes, let victim = candidate {
            candidate = victim.previous
            guard victim.block.slab !== newest else { continue }
            let slab = victim.block.slab
            let wasStranded = slabUse[ObjectIdentifier(slab)].map { isStranded(slab, $0) } ?? true
            unlink(victim)
            nodes[victim.key] = nil
            uncounted(victim)
            evictions += 1
            // What is left of a slab this eviction strands may be hot blocks among evicted
            // cold ones (a file's header read again and again): they would hold the whole slab,
            // and the walk would evict them, newer than the cold blocks that freed nothing, to
            // free it. Hot: read twice, and last used well after the block evicted now (not
            // merely the next in line: a block at the edge of two read requests of a sequential
            // reader is looked up twice, a moment apart).
            guard !wasStranded, let use = slabUse[ObjectIdentifier(slab)], isStranded(slab, use) else { continue }
            for index in use.first...use.last {
                guard let node = nodes[Key(object: use.object, block: index)], node.block.slab === slab,
                      node.hits >= 2, node.lastUse &- victim.lastUse >= hotDistance else { continue }
                relocate(node)
            }
        }
    }

    /// How much later, in blocks used, than a block of its slab just evicted a block must have
    /// been used to be kept out of the slab's eviction: a quarter of what the cache holds.
    private var hotDistance: UInt64 { UInt64(max(64, capacityBytes / Limits.blockSizeBytes / 4)) }

    /// Whether a slab's cached blocks fill less than a quarter of it (the rest was evicted).
    private func isStranded(_ slab: Slab, _ use: SlabUse) -> Bool { use.bytes * 4 < slab.memoryBytes }

    /// Counts a hit, and moves a block read again whose slab is stranded into memory of its own.
    /// Called under `lock`.
    private func hit(_ node: Node) {
        hits += 1
        node.hits += 1
        clock += 1
        node.lastUse = clock
        guard node.hits >= 2, let use = slabUse[ObjectIdentifier(node.block.slab)],
              isStranded(node.block.slab, use) else { return }
        relocate(node)
        // The copy counts until the slab's other blocks go: back within the bound now (the
        // block just hit is the newest, and stays).
        evictOverCapacity()
    }

    /// Copies the node's block into a slab of its own, so that its slab's memory goes once the
    /// slab's other blocks do (SPEC.md §7, Block cache). Without it such blocks held their whole
    /// slabs, which the cache did not count, and an agent's memory had no bound. Called under
    /// `lock`.
    private func relocate(_ node: Node) {
        let block = node.block
        guard block.length < block.slab.memoryBytes else { return }
        uncounted(node)
        node.block = CachedBlock(copying: UnsafeRawBufferPointer(start: block.pointer, count: block.length), pool: slabs)
        counted(node)
        relocations += 1
    }

    /// What the cache holds and has done since it was made (`weft cache stats`, SPEC.md §8).
    public struct Statistics: Codable, Equatable, Sendable {
        public var capacityBytes: Int
        /// Slab memory the cached blocks hold (`usedBytes`).
        public var usedBytes: Int
        public var blocks: Int
        public var slabs: Int
        /// Blocks a reader found cached.
        public var hits: Int
        /// Blocks a reader found neither cached nor being fetched, and fetched itself.
        public var misses: Int
        /// Blocks claimed to be fetched ahead of readers (read-ahead, prefetch, the rest of an
        /// object a reader's miss fetches with it).
        public var readAheadClaims: Int
        public var evictions: Int
        public var relocations: Int
    }

    public var statistics: Statistics {
        lock.lock()
        defer { lock.unlock() }
        return Statistics(capacityBytes: capacityBytes, usedBytes: usedBytes, blocks: nodes.count, slabs: slabUse.count,
                          hits: hits, misses: misses, readAheadClaims: readAheadClaims, evictions: evictions,
                          relocations: relocations)
    }

    /// Drops every cached block (`weft cache drop`). Fetches in flight still fill their blocks
    /// afterwards. The memory goes back to the `SlabPool`, which keeps it for the next fills.
    /// Returns the bytes dropped.
    @discardableResult
    public func removeAll() -> Int {
        lock.lock()
        let dropped = usedBytes
        let all = nodes
        var node = head
        while let current = node {   // neighbours hold each other strongly: unlink them all
            node = current.next
            unlink(current)
        }
        nodes = [:]
        slabUse = [:]
        usedBytes = 0
        lock.unlock()
        withExtendedLifetime(all) {}   // the blocks (and their slabs) go here, outside the lock
        return dropped
    }

    public func abandon(_ key: Key) {
        abandon([key])
    }

    /// Gives back claims a reader took with `lookup` and will not fetch (beyond a block another
    /// thread fetches, or after a failed fetch): they are not misses after all.
    public func giveBack(_ keys: [Key]) {
        abandon(keys, misses: keys.count)
    }

    /// Gives up the claims of `keys` (a failed fetch), waking waiters once.
    public func abandon(_ keys: [Key]) {
        abandon(keys, misses: 0)
    }

    /// Ends the claims of `keys` unfilled and takes `misses` off the count, under one lock.
    private func abandon(_ keys: [Key], misses notMissed: Int) {
        lock.lock()
        misses -= notMissed
        for key in keys { inFlight.remove(key) }
        lock.broadcast()
        lock.unlock()
    }

    private func moveToFront(_ node: Node) {
        guard head !== node else { return }
        unlink(node)
        insertAtFront(node)
    }

    private func insertAtFront(_ node: Node) {
        node.previous = nil
        node.next = head
        head?.previous = node
        head = node
        if tail == nil { tail = node }
    }

    private func unlink(_ node: Node) {
        node.previous?.next = node.next
        node.next?.previous = node.previous
        if head === node { head = node.next }
        if tail === node { tail = node.previous }
        node.previous = nil
        node.next = nil
    }
}
