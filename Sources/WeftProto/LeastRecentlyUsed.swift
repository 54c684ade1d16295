/// Sizes of cached objects in least-recently-used order. Not thread-safe: its owner locks.
/// Every operation is O(1).
public struct LeastRecentlyUsed<Key: Hashable> {
    private final class Node {
        let key: Key
        let bytes: UInt64
        // Both links weak: the dictionary alone owns the nodes, so dropping a long list frees
        // them one by one (a strong chain would free them recursively, a stack frame a node).
        weak var newer: Node?
        weak var older: Node?
        init(key: Key, bytes: UInt64) { self.key = key; self.bytes = bytes }
    }

    private var nodes: [Key: Node] = [:]
    /// Least recently used end.
    private var oldest: Node?
    /// Most recently used end.
    private weak var newest: Node?
    public private(set) var totalBytes: UInt64 = 0

    public init() {}

    public var count: Int { nodes.count }

    public func contains(_ key: Key) -> Bool { nodes[key] != nil }

    /// Adds `key` (or refreshes it) as the most recently used.
    public mutating func insert(_ key: Key, bytes: UInt64) {
        if nodes[key] != nil { touch(key); return }
        let node = Node(key: key, bytes: bytes)
        nodes[key] = node
        totalBytes += bytes
        append(node)
    }

    /// Marks `key` as the most recently used; false if absent.
    @discardableResult
    public mutating func touch(_ key: Key) -> Bool {
        guard let node = nodes[key] else { return false }
        guard node !== newest else { return true }
        unlink(node)
        append(node)
        return true
    }

    public mutating func remove(_ key: Key) {
        guard let node = nodes.removeValue(forKey: key) else { return }
        totalBytes -= node.bytes
        unlink(node)
    }

    /// The least recently used key other than `keeping`.
    public func leastRecent(keeping: Key? = nil) -> Key? {
        var node = oldest
        while let current = node {
            if current.key != keeping { return current.key }
            node = current.newer
        }
        return nil
    }

    private mutating func append(_ node: Node) {
        node.older = newest
        node.newer = nil
        if let newest { newest.newer = node } else { oldest = node }
        newest = node
    }

    private mutating func unlink(_ node: Node) {
        if let older = node.older { older.newer = node.newer } else { oldest = node.newer }
        if let newer = node.newer { newer.older = node.older } else { newest = node.older }
        node.newer = nil
        node.older = nil
    }
}
