#if canImport(Glibc)
import Glibc
#endif

/// A failure that carries the errno a local file system would return.
///
/// Every layer below the FUSE adapter throws `WeftError`; the adapter replies with `errno`
/// unchanged. `message` is for logs and CLI output, never for control flow.
public struct WeftError: Error, Equatable, CustomStringConvertible, Sendable {
    public let errno: Int32
    public let message: String

    public init(_ errno: Int32, _ message: String = "") {
        self.errno = errno
        self.message = message
    }

    public var description: String {
        let name = String(cString: strerror(errno))
        return message.isEmpty ? name : "\(message): \(name)"
    }

    public static func == (lhs: WeftError, rhs: WeftError) -> Bool { lhs.errno == rhs.errno }

    public static let notFound = WeftError(ENOENT)
    public static let exists = WeftError(EEXIST)
    public static let notDirectory = WeftError(ENOTDIR)
    public static let isDirectory = WeftError(EISDIR)
    public static let notEmpty = WeftError(ENOTEMPTY)
    public static let accessDenied = WeftError(EACCES)
    public static let notPermitted = WeftError(EPERM)
    public static let invalid = WeftError(EINVAL)
    public static let nameTooLong = WeftError(ENAMETOOLONG)
    public static let io = WeftError(EIO)
    public static let noData = WeftError(ENODATA)
    public static let timedOut = WeftError(ETIMEDOUT)
    public static let stale = WeftError(ESTALE)
    public static let fileTooBig = WeftError(EFBIG)
    public static let tooManyLinks = WeftError(EMLINK)
    public static let rangeError = WeftError(ERANGE)
    public static let crossDevice = WeftError(EXDEV)
    public static let notSupported = WeftError(EOPNOTSUPP)
    public static let noSpace = WeftError(ENOSPC)
    public static let busy = WeftError(EBUSY)
}
