#if canImport(Glibc)
import Glibc
#endif

/// Hard limits of a Weft volume. SPEC.md §Limits lists each with the errno returned at the bound.
public enum Limits {
    /// Longest directory entry name, in bytes (ENAMETOOLONG beyond).
    public static let nameMaxBytes = 255
    /// Longest symlink target, in bytes (ENAMETOOLONG beyond).
    public static let symlinkMaxBytes = 4095
    /// Longest xattr name, in bytes (ERANGE beyond).
    public static let xattrNameMaxBytes = 255
    /// Largest xattr value, in bytes (E2BIG beyond).
    public static let xattrValueMaxBytes = 65536
    /// Largest file size, in bytes (EFBIG beyond).
    public static let fileSizeMaxBytes: UInt64 = 1 << 50
    /// Most hard links to one inode (EMLINK beyond).
    public static let linkCountMax: UInt32 = 65000
    /// Smallest and largest chunk size a volume may be formatted with.
    public static let chunkSizeMinBytes = 64 * 1024
    public static let chunkSizeMaxBytes = 64 * 1024 * 1024
    /// Checksum and compression unit inside a chunk; also the agent's cache block.
    public static let blockSizeBytes = 64 * 1024
    /// Most entries one readdir page returns.
    public static let readdirPageMaxEntries = 4096
    /// Largest single data transfer (one readSlice / writeSlice).
    public static let transferMaxBytes = 64 * 1024 * 1024
    /// Most holder hubs one `readSlice(holders:)` names.
    public static let holdersMax = 16
    /// Largest piece of an object file one `fetchObject` moves between hubs.
    public static let fetchPieceMaxBytes = 8 * 1024 * 1024
    /// Most object ids one `discardUploads` names.
    public static let discardUploadsMax = 4096

    /// Most inodes one `releaseMany` names.
    public static let releaseManyMax = 4096

    /// Most chunk lists one `openLayout` asks for (the agent asks for 8, as its `layout` calls).
    public static let openLayoutChunksMax = 64
    /// Largest object whose bytes an `openLayout` reply carries: one checksum block, so that
    /// the agent caches it as the block a read would fetch.
    public static let openLayoutDataMaxBytes = blockSizeBytes

    /// Largest object whose bytes a durable commit puts in the metadata journal instead of
    /// syncing the object first, and most such objects per commit (SPEC.md §5).
    public static let journaledObjectMaxBytes = 64 * 1024
    public static let journaledObjectsPerCommitMax = 16

    /// EINVAL when a `discardUploads` names more than `discardUploadsMax` ids.
    public static func checkDiscardUploads(_ count: Int) throws {
        try checkListCount(count, max: discardUploadsMax, "discardUploads", "objects")
    }

    /// EINVAL when a list argument of `call` names more than `max` items.
    public static func checkListCount(_ count: Int, max: Int, _ call: String, _ items: String) throws {
        guard count <= max else {
            throw WeftError(EINVAL, "\(call) names \(count) \(items), over the \(max) limit")
        }
    }
}

/// Requests a mounted agent serves itself, reached through the mount (SPEC.md §8).
public enum AgentControl {
    /// Setting this extended attribute on the mount's root drops the agent's cached file data
    /// (`weft cache drop`). The kernel lets only CAP_SYS_ADMIN set `trusted.*` names.
    public static let dropCacheAttribute = "trusted.weft.cache.drop"
    /// Reading this extended attribute of the mount's root gives the agent's cache statistics
    /// as JSON (`weft cache stats`); `trusted.*` again, so root only.
    public static let cacheStatisticsAttribute = "trusted.weft.cache.stats"
}
