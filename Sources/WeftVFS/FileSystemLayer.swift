import Foundation
import WeftProto

/// What the FUSE adapter calls: one volume (`VFS`) or the global root over many
/// (`GlobalNamespace`). Inode numbers and handles are the kernel's.
public protocol FileSystemLayer: AnyObject, Sendable {
    /// `caller`: the thread that asked (the FUSE request's pid, 0 if unknown).
    func lookup(_ credentials: Credentials, parent: InodeID, name: [UInt8], caller: Int32) throws -> Attributes
    func getattr(_ credentials: Credentials, ino: InodeID) throws -> Attributes
    func setattr(_ credentials: Credentials, ino: InodeID, _ changes: SetAttributes) throws -> Attributes
    func mkdir(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes
    func mknod(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
               umask: UInt32) throws -> Attributes
    func unlink(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws
    func rmdir(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws
    func symlink(_ credentials: Credentials, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes
    func readlink(_ credentials: Credentials, ino: InodeID) throws -> [UInt8]
    func link(_ credentials: Credentials, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes
    func rename(_ credentials: Credentials, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8],
                flags: RenameFlags) throws
    func access(_ credentials: Credentials, ino: InodeID, mask: UInt32) throws
    func statfs(_ credentials: Credentials, ino: InodeID) throws -> FileSystemStats
    func getxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws -> [UInt8]
    func setxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws
    func listxattr(_ credentials: Credentials, ino: InodeID) throws -> [[UInt8]]
    func removexattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws
    func opendir(_ credentials: Credentials, ino: InodeID) throws -> UInt64
    func readdir(handle id: UInt64, offset: Int, limit: Int) throws -> [DirectoryEntry]
    func releasedir(handle id: UInt64)
    /// Makes the directory's changes durable (fsyncdir).
    func syncDirectory(_ credentials: Credentials, ino: InodeID) throws
    func open(_ credentials: Credentials, ino: InodeID, flags: Int32) throws -> (handle: UInt64, keepCache: Bool)
    func create(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                flags: Int32) throws -> (attributes: Attributes, handle: UInt64)
    func read(handle id: UInt64, offset: UInt64, size: Int) throws -> ReadResult
    func write(handle id: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) throws -> Int
    /// `count` bytes that `fill` copies, in order, piece by piece, into the write buffer.
    func write(handle id: UInt64, offset: UInt64, count: Int,
               fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws -> Int
    func flush(handle id: UInt64) throws
    func fsync(handle id: UInt64) throws
    func release(handle id: UInt64) throws
    /// One attempt at a lock call on `ino` (the FUSE layer retries EAGAIN for blocking calls).
    func lock(_ credentials: Credentials, ino: InodeID, _ request: LockRequest) throws -> LockDescription
    /// Commits everything buffered, durably, and ends the sessions.
    func shutdown() throws
    /// Drops the agent's cached file data (`weft cache drop`); returns the bytes dropped.
    func dropCachedData() -> Int
    /// The agent's data caches and buffers (`weft cache stats`); nil before any volume is open.
    func cacheStatistics() -> AgentCacheStatistics?
    /// A token to take before a call whose reply the kernel may cache (SPEC.md §12.6).
    func cacheToken() -> UInt64
    /// Whether the kernel may cache a reply about `ino` to a call begun at `token`: no recall of
    /// it and no loss of leases came in between.
    func mayCache(_ ino: InodeID, since token: UInt64) -> Bool
    /// The cache the FUSE layer hooks its kernel invalidations into.
    var leaseCache: LeaseCache { get }
}

extension VFS: FileSystemLayer {
    public func statfs(_ credentials: Credentials, ino: InodeID) throws -> FileSystemStats {
        try statfs(credentials)
    }

    public func syncDirectory(_ credentials: Credentials, ino: InodeID) throws {
        try syncHub(context(credentials))
    }

    public func dropCachedData() -> Int {
        let dropped = cache.removeAll()
        logger.info("dropped \(dropped >> 20) MiB of cached data")
        return dropped
    }

    public func cacheStatistics() -> AgentCacheStatistics? {
        let (pooled, live) = cache.slabs.usage
        return AgentCacheStatistics(blockCache: cache.statistics, slabPooledBytes: pooled, slabsInUseBytes: live,
                                    slabAllocations: cache.slabs.allocations, slabBudgetBytes: cache.slabs.budgetBytes,
                                    writeBufferUsedBytes: budget.used, writeBufferLimitBytes: budget.limitBytes)
    }

    public func lock(_ credentials: Credentials, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        try hub.lock(context(credentials), ino: ino, request)
    }
}

/// `weft cache stats` (SPEC.md §8): what the agent's block cache holds and has done, the slab
/// memory behind it, and the write buffer. The agent sends it as JSON.
public struct AgentCacheStatistics: Codable, Equatable, Sendable {
    public var blockCache: BlockCache.Statistics
    /// Slab memory kept for reuse, and pooled-size slabs in use (cached or being fetched into).
    public var slabPooledBytes: Int
    public var slabsInUseBytes: Int
    /// Pooled-size slabs mapped (not taken from the pool) since the agent started.
    public var slabAllocations: Int
    /// What the pool keeps while slabs in use and pooled stay within (SPEC.md §7, Slab memory).
    public var slabBudgetBytes: Int
    public var writeBufferUsedBytes: Int
    public var writeBufferLimitBytes: Int

    public func json() throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return Array(try encoder.encode(self))
    }

    public static func decoding(_ json: [UInt8]) throws -> AgentCacheStatistics {
        try JSONDecoder().decode(AgentCacheStatistics.self, from: Data(json))
    }
}
