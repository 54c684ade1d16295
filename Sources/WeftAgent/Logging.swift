import Foundation
import Logging

/// Log lines go to stderr, one per line, with a timestamp and level.
public enum WeftLogging {
    private static let once: Void = {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = ProcessInfo.processInfo.environment["WEFT_LOG_LEVEL"].flatMap { Logger.Level(rawValue: $0) } ?? .info
            return handler
        }
    }()

    /// A logger at `level` (WEFT_LOG_LEVEL overrides it). One-shot commands log warnings only.
    public static func logger(_ label: String, level: Logger.Level = .info) -> Logger {
        _ = once
        var logger = Logger(label: label)
        logger.logLevel = ProcessInfo.processInfo.environment["WEFT_LOG_LEVEL"].flatMap { Logger.Level(rawValue: $0) } ?? level
        return logger
    }
}
