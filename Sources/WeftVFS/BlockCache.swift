import Foundation
import WeftProto

/// Page-aligned memory that one fetch reads into; the blocks cut from it share it, and it is
/// freed when the last of them goes.
public final class Slab: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let capacity: Int

    public init(capacity: Int) {
        self.capacity = capacity
        pointer = SlabMemory.take(capacity)
    }

    deinit { SlabMemory.give(pointer, capacity) }
}

/// Recycles the memory of large slabs (up to `keptMax` of each size, all under 64 MiB in total
/// for the common chunk size): touching fresh pages costs more than reading into reused ones.
enum SlabMemory {
    static let lock = NSLock()
    nonisolated(unsafe) static var free: [Int: [UnsafeMutableRawPointer]] = [:]
    static let keptMax = 16
    static let pooledMinBytes = 1 << 20

    static func take(_ capacity: Int) -> UnsafeMutableRawPointer {
        if capacity >= pooledMinBytes {
            lock.lock()
            let reused = free[capacity]?.popLast()
            lock.unlock()
            if let reused { return reused }
        }
        return UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 4096)
    }

    static func give(_ pointer: UnsafeMutableRawPointer, _ capacity: Int) {
        if capacity >= pooledMinBytes {
            lock.lock()
            if free[capacity, default: []].count < keptMax {
                free[capacity, default: []].append(pointer)
                lock.unlock()
                return
            }
            lock.unlock()
        }
        pointer.deallocate()
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

    public convenience init(copying source: UnsafeRawBufferPointer) {
        let slab = Slab(capacity: source.count)
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
/// Bounded by `capacityBytes` with LRU eviction. A block being fetched is fetched once: other
/// readers of the same block wait for that fetch (single flight).
public final class BlockCache: @unchecked Sendable {
    public struct Key: Hashable {
        public var object: SliceID
        public var block: UInt32
    }

    private final class Node {
        let key: Key
        let block: CachedBlock
        var previous: Node?
        var next: Node?
        init(key: Key, block: CachedBlock) { self.key = key; self.block = block }
    }

    private let lock = NSCondition()
    private var nodes: [Key: Node] = [:]
    private var head: Node?   // most recently used
    private var tail: Node?   // least recently used
    private var inFlight: Set<Key> = []
    public private(set) var usedBytes = 0
    public let capacityBytes: Int

    public init(capacityBytes: Int) {
        self.capacityBytes = max(capacityBytes, Limits.blockSizeBytes * 4)
    }

    public func get(_ key: Key) -> CachedBlock? {
        lock.lock()
        defer { lock.unlock() }
        guard let node = nodes[key] else { return nil }
        moveToFront(node)
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
                return (node.block, false)
            }
            if !inFlight.contains(key) {
                inFlight.insert(key)
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
        return true
    }

    public func fill(_ key: Key, _ block: CachedBlock) {
        lock.lock()
        defer { lock.unlock() }
        inFlight.remove(key)
        if nodes[key] == nil {
            let node = Node(key: key, block: block)
            nodes[key] = node
            insertAtFront(node)
            usedBytes += block.length
            while usedBytes > capacityBytes, let victim = tail {
                unlink(victim)
                nodes[victim.key] = nil
                usedBytes -= victim.block.length
            }
        }
        lock.broadcast()
    }

    public func abandon(_ key: Key) {
        lock.lock()
        inFlight.remove(key)
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
