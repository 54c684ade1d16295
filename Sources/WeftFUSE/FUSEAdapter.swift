import CFuse3
import Foundation
import Logging
import WeftProto
import WeftVFS

/// Mount settings of the FUSE adapter.
public struct MountOptions: Sendable {
    /// Seconds the kernel may cache attributes and names (SPEC.md §Consistency).
    public var attributeTimeoutSeconds: Double = 1.0
    public var entryTimeoutSeconds: Double = 1.0
    /// Allow users other than the mounting one (only when running as root).
    public var allowOther: Bool = getuid() == 0
    public var fsName: String = "weft"
    public var maxThreads: UInt32 = 16

    public init() {}
}

/// A thin libfuse3 low-level adapter: each callback decodes its arguments, calls the VFS and
/// encodes the reply. Errors become the errno carried by `WeftError`.
public final class FUSEAdapter: @unchecked Sendable {
    let vfs: FileSystemLayer
    /// Inodes on which this agent has taken a lock (so close knows whether to release any).
    let lockedInodes = LockedSet()
    let options: MountOptions
    let logger: Logger
    private var session: OpaquePointer?
    var sessionBox: SessionBox?
    public let mountpoint: String
    static let maxIOBytes: UInt32 = 1 << 20
    /// Kernel read-ahead for the mount. The kernel starts FUSE mounts at 128 KiB; a larger window
    /// lets it keep several 1 MiB reads in flight.
    static let readaheadBytes = 8 << 20

    public init(vfs: FileSystemLayer, mountpoint: String, options: MountOptions, logger: Logger) {
        self.vfs = vfs
        self.mountpoint = mountpoint
        self.options = options
        self.logger = logger
    }

    /// Creates the session and mounts. Throws with a clear message if the kernel refuses.
    public func mount() throws {
        // default_permissions: the kernel checks mode bits against its cached attributes on every
        // access (cached lookups included); the hub checks again on every change.
        var arguments = ["weft", "-o", "fsname=\(options.fsName),subtype=weft,max_read=\(Self.maxIOBytes),default_permissions"]
        if options.allowOther { arguments += ["-o", "allow_other"] }
        var cArguments = arguments.map { strdup($0) }
        defer { cArguments.forEach { free($0) } }
        var ops = FUSEAdapter.operations()
        let created: OpaquePointer? = cArguments.withUnsafeMutableBufferPointer { buffer in
            var args = fuse_args(argc: Int32(buffer.count), argv: buffer.baseAddress, allocated: 0)
            let session = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size,
                                           Unmanaged.passUnretained(self).toOpaque())
            fuse_opt_free_args(&args)
            return session
        }
        guard let created else { throw WeftError(EINVAL, "cannot create FUSE session") }
        session = created
        if fuse_session_mount(created, mountpoint) != 0 {
            fuse_session_destroy(created)
            session = nil
            throw WeftError(EIO, "cannot mount FUSE at \(mountpoint) (is /dev/fuse available and the mountpoint an empty directory?)")
        }
        hookInvalidations(created)
    }

    /// Serves requests on a pool of threads until unmounted or `exit()` is called.
    public func run() throws {
        guard let session else { throw WeftError(EINVAL, "not mounted") }
        guard let config = fuse_loop_cfg_create() else { throw WeftError(ENOMEM) }
        defer { fuse_loop_cfg_destroy(config) }
        fuse_loop_cfg_set_max_threads(config, options.maxThreads)
        fuse_loop_cfg_set_idle_threads(config, options.maxThreads)  // no thread churn
        let result = fuse_session_loop_mt(session, config)
        sessionBox?.detach()
        fuse_session_unmount(session)
        fuse_session_destroy(session)
        self.session = nil
        if result < 0 { throw WeftError(-result, "FUSE session ended with an error") }
    }

    /// Makes `run()` return (used on SIGTERM/SIGINT).
    public func exit() {
        if let session { fuse_session_exit(session) }
    }

    /// The fd of the FUSE connection, to wake the loop after `exit()`.
    public var isMounted: Bool { session != nil }

    // MARK: helpers used by the callbacks

    static func adapter(_ req: fuse_req_t?) -> FUSEAdapter {
        Unmanaged<FUSEAdapter>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    static func credentials(_ req: fuse_req_t?) -> Credentials {
        let context = fuse_req_ctx(req)!.pointee
        var credentials = Credentials(uid: context.uid, gid: context.gid)
        if context.uid != 0 {
            var groups = [gid_t](repeating: 0, count: 64)
            let count = fuse_req_getgroups(req, Int32(groups.count), &groups)
            if count > 0 { credentials.groups = Array(groups.prefix(min(Int(count), groups.count))) }
        }
        return credentials
    }

    static func umask(_ req: fuse_req_t?) -> UInt32 {
        UInt32(fuse_req_ctx(req)!.pointee.umask)
    }

    static func name(_ cName: UnsafePointer<CChar>?) -> [UInt8] {
        guard let cName else { return [] }
        return Array(UnsafeRawBufferPointer(start: cName, count: strlen(cName)))
    }

    /// The lease token taken when the calling thread's current request began (SPEC.md §12.6).
    private static let tokenKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    static var requestToken: UInt64 { UInt64(UInt(bitPattern: pthread_getspecific(tokenKey))) }

    /// Runs `body`; a thrown `WeftError` is replied as its errno, anything else as EIO. Takes the
    /// lease token first, so replies cache only what no recall overtook. With
    /// `staleIfMissing` (requests about an inode the kernel holds, not about a name), ENOENT is
    /// answered as ESTALE: the inode the kernel found under a name is gone (another agent
    /// replaced or removed the name after the lookup), and on ESTALE the kernel's path-based
    /// calls (`stat`, `open`) look the path up again, so they see the name's
    /// current file, or ENOENT if it has none (SPEC.md §12.6, "An inode gone under a name").
    static func reply(_ req: fuse_req_t?, staleIfMissing: Bool = false, _ body: () throws -> Void) {
        let token = adapter(req).vfs.cacheToken()
        pthread_setspecific(tokenKey, UnsafeRawPointer(bitPattern: UInt(token)))
        do {
            try body()
        } catch let error as WeftError {
            if error.errno == EIO || error.errno == ETIMEDOUT {
                adapter(req).logger.error("request failed: \(error)")
            }
            fuse_reply_err(req, staleIfMissing && error.errno == ENOENT ? ESTALE : error.errno)
        } catch {
            adapter(req).logger.error("request failed: \(error)")
            fuse_reply_err(req, EIO)
        }
    }

    func stat(_ attributes: Attributes) -> stat {
        var st = Glibc.stat()
        st.st_ino = UInt(attributes.ino)
        st.st_mode = attributes.mode
        st.st_nlink = UInt(attributes.nlink)
        st.st_uid = attributes.uid
        st.st_gid = attributes.gid
        st.st_rdev = UInt(attributes.rdev)
        st.st_size = Int(attributes.size)
        st.st_blksize = 4096
        st.st_blocks = Int((min(attributes.allocatedBytes, attributes.size) + 511) / 512)
        st.st_atim = Self.timespec(attributes.atimeNs)
        st.st_mtim = Self.timespec(attributes.mtimeNs)
        st.st_ctim = Self.timespec(attributes.ctimeNs)
        return st
    }

    /// Nanoseconds since the epoch as a timespec; times before 1970 floor toward minus infinity.
    static func timespec(_ ns: Int64) -> Glibc.timespec {
        var seconds = ns / 1_000_000_000
        var nanoseconds = ns % 1_000_000_000
        if nanoseconds < 0 {
            seconds -= 1
            nanoseconds += 1_000_000_000
        }
        return Glibc.timespec(tv_sec: Int(seconds), tv_nsec: Int(nanoseconds))
    }

    /// The entry for `attributes` under `parent`. The kernel may cache it only under leases on
    /// both (nil `parent`: never, as for readdirplus pages fetched by earlier calls).
    func entry(_ attributes: Attributes, parent: fuse_ino_t?) -> fuse_entry_param {
        var entry = fuse_entry_param()
        entry.ino = attributes.ino
        entry.generation = 1
        entry.attr = stat(attributes)
        let token = Self.requestToken
        let cached = parent != nil && vfs.mayCache(attributes.ino, since: token)
        entry.attr_timeout = cached ? options.attributeTimeoutSeconds : 0
        entry.entry_timeout = cached && vfs.mayCache(parent!, since: token) ? options.entryTimeoutSeconds : 0
        Trace.note("fuse entry parent=\(parent.map(String.init) ?? "-") ino=\(attributes.ino) size=\(attributes.size) "
                   + "dv=\(attributes.dataVersion) attr_timeout=\(entry.attr_timeout) entry_timeout=\(entry.entry_timeout)")
        return entry
    }

    func replyEntry(_ req: fuse_req_t?, parent: fuse_ino_t, _ attributes: Attributes) {
        var e = entry(attributes, parent: parent)
        fuse_reply_entry(req, &e)
    }

    func replyAttributes(_ req: fuse_req_t?, _ attributes: Attributes) {
        var st = stat(attributes)
        let cached = vfs.mayCache(attributes.ino, since: Self.requestToken)
        Trace.note("fuse attr ino=\(attributes.ino) size=\(attributes.size) dv=\(attributes.dataVersion) cached=\(cached)")
        fuse_reply_attr(req, &st, cached ? options.attributeTimeoutSeconds : 0)
    }

    /// After the reply to a read or write: pages it left in the kernel's cache that no lease
    /// covers (a recall or notice of the inode came since the request began) are dropped at
    /// once, on this thread, before it serves anything else. (Not before the reply: the kernel
    /// holds them locked until it has the reply.) A change that overtook the request does not
    /// wait for this agent, so these pages must not outlive it (SPEC.md §12.6).
    func dropUncoveredPages(_ ino: fuse_ino_t, offset: off_t, length: Int) {
        guard length > 0, !vfs.mayCache(ino, since: Self.requestToken), let box = sessionBox else { return }
        Trace.note("fuse drop-uncovered ino=\(ino) offset=\(offset) length=\(length)")
        box.invalidateInode(ino, offset: Int64(offset), length: Int64(length))
    }

    /// Connects the VFS's recalls to the kernel's caches.
    func hookInvalidations(_ session: OpaquePointer) {
        let box = SessionBox(session)
        sessionBox = box
        let refreshes = vfs.leaseCache.refreshes
        vfs.leaseCache.invalidateInode = { ino in
            refreshes.waitForNone(ino)
            box.invalidateInode(ino, offset: 0, length: 0)
        }
        vfs.leaseCache.invalidateEntry = { parent, name in box.invalidateEntry(parent, name) }
        vfs.leaseCache.expireAllEntries = { box.expireAllEntries() }
    }

    func connectionInit(_ conn: UnsafeMutablePointer<fuse_conn_info>) {
        conn.pointee.max_write = Self.maxIOBytes
        conn.pointee.max_read = Self.maxIOBytes
        conn.pointee.max_readahead = UInt32(Self.readaheadBytes)
        conn.pointee.want |= UInt32(FUSE_CAP_ATOMIC_O_TRUNC) & conn.pointee.capable
        conn.pointee.want |= UInt32(FUSE_CAP_PARALLEL_DIROPS) & conn.pointee.capable
        conn.pointee.want &= ~UInt32(FUSE_CAP_WRITEBACK_CACHE)
        // Locks are held at the volume's home hub, so they hold across nodes (SPEC.md §12.6).
        conn.pointee.want |= UInt32(FUSE_CAP_POSIX_LOCKS) & conn.pointee.capable
        conn.pointee.want |= UInt32(FUSE_CAP_FLOCK_LOCKS) & conn.pointee.capable
        conn.pointee.max_background = 64
        conn.pointee.congestion_threshold = 48
        // libfuse splices requests into a pipe only if the pipe holds a whole one; otherwise
        // every receive would try, fail and read instead. Say once why writes cost a copy more.
        if conn.pointee.want & UInt32(FUSE_CAP_SPLICE_READ) != 0 && !Self.pipeHoldsARequest() {
            conn.pointee.want &= ~UInt32(FUSE_CAP_SPLICE_READ)
            let limit = (try? String(contentsOfFile: "/proc/sys/fs/pipe-max-size", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown"
            logger.notice("""
                FUSE requests are read, not spliced: a pipe cannot hold \(Self.requestBufferBytes) bytes \
                (fs.pipe-max-size \(limit), no CAP_SYS_RESOURCE), so each write's data is copied once \
                more; Deploy/weft-tune raises the limit
                """)
        }
    }

    /// The most a request takes in libfuse's receive buffer: the largest write and a page of header.
    static let requestBufferBytes = Int(maxIOBytes) + 4096

    /// Whether this process can size a pipe to hold a whole request (what libfuse's splice
    /// receive asks for: fs.pipe-max-size, or CAP_SYS_RESOURCE above it).
    static func pipeHoldsARequest() -> Bool {
        let setPipeSize: Int32 = 1031    // F_SETPIPE_SZ (F_LINUX_SPECIFIC_BASE + 7), a GNU name Swift does not see
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { return false }
        defer { close(ends[0]); close(ends[1]) }
        return fcntl(ends[0], setPipeSize, Int32(requestBufferBytes)) >= requestBufferBytes
    }

    /// Raises the mount's kernel read-ahead (root only; the kernel caps it at INIT time, so this
    /// runs just after INIT has been answered).
    func raiseKernelReadahead() {
        var st = Glibc.stat()
        guard getuid() == 0, lstat(mountpoint, &st) == 0 else { return }
        let device = UInt64(st.st_dev)
        let major = (device >> 8) & 0xfff | (device >> 32) & ~0xfff
        let minor = device & 0xff | (device >> 12) & ~0xff
        let path = "/sys/class/bdi/\(major):\(minor)/read_ahead_kb"
        do {
            try "\(Self.readaheadBytes / 1024)".write(toFile: path, atomically: false, encoding: .utf8)
        } catch {
            logger.debug("cannot raise read-ahead at \(path): \(error)")
        }
    }

    func destroy() {
        do { try vfs.shutdown() } catch { logger.error("flush at unmount failed: \(error)") }
    }
}

// MARK: Locks

extension FUSEAdapter {
    /// Longest pause between two attempts of a blocking lock.
    static let lockRetryMaxMs = 100

    /// The request for a `struct flock` from the kernel (ranges made absolute by the kernel).
    static func lockRequest(_ lock: flock, owner: UInt64) throws -> LockRequest {
        guard let type = LockType(rawValue: UInt8(truncatingIfNeeded: lock.l_type)) else { throw WeftError(EINVAL) }
        guard lock.l_start >= 0, lock.l_len >= 0 else { throw WeftError(EINVAL) }
        let start = UInt64(lock.l_start)
        let end = lock.l_len == 0 ? UInt64.max : start + UInt64(lock.l_len) - 1
        return LockRequest(kind: .posix, type: type, start: start, end: end, owner: owner, pid: UInt32(bitPattern: lock.l_pid))
    }

    /// Sets `request`; with `wait`, retries a conflicting lock until it is granted or the
    /// caller is interrupted (EINTR).
    func setLock(_ req: fuse_req_t?, ino: fuse_ino_t, _ request: LockRequest, wait: Bool) throws {
        var pauseMs = 1
        if request.type != .unlock { lockedInodes.withLock { _ = $0.insert(ino) } }
        while true {
            do {
                _ = try vfs.lock(FUSEAdapter.credentials(req), ino: ino, request)
                return
            } catch let error as WeftError where error.errno == EAGAIN && wait {
                if fuse_req_interrupted(req) != 0 { throw WeftError(EINTR) }
                usleep(useconds_t(pauseMs * 1000))
                pauseMs = min(pauseMs * 2, Self.lockRetryMaxMs)
            }
        }
    }

    /// Drops every lock of `owner` of one kind on `ino` (close and last release).
    func unlockAll(_ req: fuse_req_t?, ino: fuse_ino_t, kind: LockKind, owner: UInt64) throws {
        // Only inodes this agent ever locked: a close of any other file costs no hub call.
        guard owner != 0, lockedInodes.withLock({ $0.contains(ino) }) else { return }
        _ = try vfs.lock(FUSEAdapter.credentials(req), ino: ino, LockRequest(kind: kind, type: .unlock, owner: owner, pid: 0))
    }
}

/// A set of inode numbers behind a lock.
final class LockedSet: @unchecked Sendable {
    private let lock = NSLock()
    private var set: Set<fuse_ino_t> = []

    func withLock<T>(_ body: (inout Set<fuse_ino_t>) -> T) -> T {
        lock.lock()
        defer { lock.unlock() }
        return body(&set)
    }
}

/// The FUSE session for kernel cache invalidations from any thread, until it is torn down.
///
/// No lock is held while a notification is in the kernel: an entry invalidation can wait there
/// for a directory's lock (held by this agent's own change of that directory, whose call may be
/// waiting for another agent), and must not hold up the other notifications meanwhile.
final class SessionBox: @unchecked Sendable {
    private let condition = NSCondition()
    private var session: OpaquePointer?
    /// Notifications in the kernel now; `detach` waits for them.
    private var users = 0
    /// Whether the kernel takes expire-only entry notifications (set false at the first EINVAL).
    private var expireOnly = true
    /// Whether the kernel takes epoch notifications (set false at the first failure).
    private var epochs = true

    init(_ session: OpaquePointer) { self.session = session }

    /// After this returns no notification is in flight and none starts.
    func detach() {
        condition.lock()
        session = nil
        while users > 0 { condition.wait() }
        condition.unlock()
    }

    /// Runs `body` with the session, unless it is detached; never holds the lock around it.
    private func withSession<T>(_ body: (OpaquePointer) -> T) -> T? {
        condition.lock()
        guard let session else {
            condition.unlock()
            return nil
        }
        users += 1
        condition.unlock()
        let result = body(session)
        condition.lock()
        users -= 1
        if users == 0 { condition.broadcast() }
        condition.unlock()
        return result
    }

    /// Drops the kernel's attributes of `ino` and its pages in `[offset, offset+length)` (0: all).
    /// The kernel takes no inode lock for this.
    func invalidateInode(_ ino: UInt64, offset: Int64, length: Int64) {
        _ = withSession { session in
            fuse_lowlevel_notify_inval_inode(session, fuse_ino_t(ino), off_t(offset), off_t(length))
        }
    }

    /// Makes the kernel look `name` of `parent` up again before using it: marks the entry expired
    /// where the kernel can, else invalidates it. Either way the kernel takes the directory's
    /// lock, so this can wait for an operation in progress in that directory (SPEC.md §12.6).
    func invalidateEntry(_ parent: UInt64, _ name: [UInt8]) {
        var cName = name.map { CChar(bitPattern: $0) }
        cName.append(0)
        _ = withSession { session in
            if condition.withLock({ expireOnly }) {
                let result = weft_notify_expire_entry(session, UInt64(parent), cName, name.count)
                if result != -EINVAL { return }   // done, or the entry is not cached (ENOENT)
                condition.withLock { expireOnly = false }
            }
            _ = fuse_lowlevel_notify_inval_entry(session, fuse_ino_t(parent), cName, name.count)
        }
    }

    /// Makes every entry the kernel caches for this mount stale, without taking any lock
    /// (FUSE_NOTIFY_INC_EPOCH). False when the kernel cannot (before Linux 6.16) or the session
    /// is gone.
    func expireAllEntries() -> Bool {
        withSession { session in
            guard condition.withLock({ epochs }) else { return false }
            if weft_notify_inc_epoch(session) == 0 { return true }
            condition.withLock { epochs = false }
            return false
        } ?? false
    }
}
